"""User-facing errors: the CLI prints them as one line and exits non-zero, without a traceback."""


class AdaLoraDeployError(Exception):
    """Base class for errors caused by the user's input; the message says what to do next."""


class CheckpointError(AdaLoraDeployError):
    """A checkpoint or adapter directory is missing, corrupt, or does not match its base model."""


class DataError(AdaLoraDeployError):
    """A dataset cannot be read or lacks what the task needs."""


class OutputExistsError(AdaLoraDeployError):
    """An output directory exists and is not empty, and overwriting was not asked for."""


class ConfigError(AdaLoraDeployError, ValueError):
    """An invalid configuration value; the message names the value and the fix."""


class TrainingError(AdaLoraDeployError):
    """Training cannot go on (e.g. the loss became NaN); nothing was written."""
