"""Errors of the export stage; both are AdaLoraDeployError, so the CLI prints one line and exits 2."""

from __future__ import annotations

from adalora_deploy.errors import AdaLoraDeployError


class ExportError(AdaLoraDeployError):
    """The export cannot be done as asked (bad flag combination, unsupported task or architecture)."""


class ExportValidationError(ExportError):
    """The exported graphs do not match PyTorch; lists every failed check, not just the first."""

    def __init__(self, failures: list[str]):
        self.failures = list(failures)
        lines = "\n  - ".join(self.failures)
        super().__init__(
            f"export validation failed ({len(self.failures)} check(s)); nothing was written:\n  - {lines}"
        )
