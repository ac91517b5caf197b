"""adalora-deploy: AdaLoRA training, pruned ONNX export, and ONNX Runtime serving."""

__version__ = "0.1.0"

from .config import AdaLoraConfig  # noqa: E402
from .errors import AdaLoraDeployError, CheckpointError, ConfigError, DataError, OutputExistsError  # noqa: E402

__all__ = ["AdaLoraConfig", "AdaLoraDeployError", "CheckpointError", "ConfigError", "DataError", "OutputExistsError", "__version__"]
