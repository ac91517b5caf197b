"""ONNX Runtime sessions, the predictor and the HTTP server (installed as adalora_deploy.runtime).

    from adalora_deploy.runtime import Predictor
    predictor = Predictor.from_pretrained("onnx/", mode="merged")   # provider="auto": CUDA if it starts
    predictor(["a gripping film", ("premise", "hypothesis")]).labels

The server (FastAPI) lives in adalora_deploy.runtime.server, imported on demand. The benchmark
is a top-layer package, adalora_deploy.bench.
"""

from .predictor import Predictions, Predictor
from .session import ExportDirError, OrtSession, ProviderUnavailableError, SessionConfig, open_session

__all__ = [
    "ExportDirError", "OrtSession", "Predictions", "Predictor", "ProviderUnavailableError",
    "SessionConfig", "open_session",
]
