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
    """Training cannot go on."""


class DivergedError(TrainingError):
    """The loss or the gradient norm became non-finite at `step` (1-based), before that step was applied.

    Attributes:
        steps_done: the steps behind the last good state: step - 2, since the weights after step - 1
            gave the non-finite value; the last whose loss and gradients were finite are those before.
        model: the model, put back in that state, set by `train`.
        checkpoint: where that state was written (a checkpoint marked `stopped_early`), or None.
        losses, budgets: the per-step figures of the steps that completed.
    """

    def __init__(self, what: str, value: float, step: int, steps: int, lr: float):
        super().__init__(what, value, step, steps, lr)
        self.what, self.value, self.step, self.steps, self.lr = what, value, step, steps, lr
        self.steps_done = 0
        self.model = self.checkpoint = None
        self.unsaved = ""  # why nothing was written, e.g. " (no step had completed)"
        self.losses: list[float] = []
        self.budgets: list[int] = []

    def __str__(self) -> str:
        head = f"the {self.what} became {self.value} at step {self.step} of {self.steps}: training stopped before applying it"
        fix = f"lower --lr (now {self.lr:g}) or --alpha, or check the data"
        if self.checkpoint is not None:
            return (f"{head}; the last good state (after step {self.steps_done}) is in {self.checkpoint} as a checkpoint "
                    f"marked stopped early (it exports, but is not trained to the end); {fix}, and train again")
        return f"{head}; nothing was written{self.unsaved}; {fix}"
