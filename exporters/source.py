"""What an export starts from: an adalora-deploy checkpoint or a PEFT AdaLoRA adapter, auto-detected."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from adalora_deploy.constants import (
    ADAPTER_FILE,
    CHECKPOINT_FORMAT,
    PEFT_CONFIG_FILE,
    PEFT_SOURCE_KIND,
    PEFT_WEIGHTS_FILE,
    TOKENIZER_FILES,
)
from adalora_deploy.constants import CHECKPOINT_CONFIG_FILE as CONFIG_FILE
from adalora_deploy.errors import CheckpointError
from adalora_deploy.fingerprint import verify as verify_fingerprint
from adalora_deploy.model import AdaLoraModel, read_checkpoint_config, resolve_model_path
from adalora_deploy.peft_import import load_peft_adapter


@dataclass
class Source:
    """A loaded checkpoint.

    Attributes:
        kind: "adalora-deploy-checkpoint" or "peft-adalora".
        path: the directory it was read from.
        model: the adapted model (unpruned, masks applied), in eval mode.
        files: the files whose sha256 identifies the source (weights and config).
        tokenizer_dir: where the tokenizer files are (the checkpoint, else the base model).
        fingerprint: how the reloaded model reproduced the outputs recorded at save time (None when the
            source has no fingerprint: PEFT adapters, checkpoints of earlier releases).
        stopped_early: the checkpoint config's record of a diverged run whose last good state it holds
            (steps_done, steps_planned, reason), else None.
    """

    kind: str
    path: Path
    model: AdaLoraModel
    files: list[Path]
    tokenizer_dir: str
    fingerprint: dict | None = None
    stopped_early: dict | None = None

    @property
    def task(self) -> str:
        return self.model.task


def _tokenizer_dir(path: Path, model: AdaLoraModel) -> str:
    if any((path / name).is_file() for name in TOKENIZER_FILES):
        return str(path)
    return resolve_model_path(model.base_model["name_or_path"])


def load_source(checkpoint: str | os.PathLike, base: str | None = None) -> Source:
    """Load `checkpoint`, telling the two formats apart by their config file.

    Args:
        checkpoint: a directory from `adalora-deploy train` (adalora_config.json) or a PEFT AdaLoRA
            adapter (adapter_config.json + adapter_model.safetensors).
        base: overrides the base model the checkpoint names.
    """
    path = Path(checkpoint)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    stopped = None
    if (path / CONFIG_FILE).is_file():
        model = AdaLoraModel.from_pretrained(path, base=base).eval()
        kind, files = CHECKPOINT_FORMAT, [path / ADAPTER_FILE, path / CONFIG_FILE]
        fingerprint = verify_fingerprint(model.model, path)
        stopped = read_checkpoint_config(path).get("stopped_early")
    elif (path / PEFT_CONFIG_FILE).is_file():
        model, fingerprint = load_peft_adapter(path, base=base), None
        kind, files = PEFT_SOURCE_KIND, [path / PEFT_WEIGHTS_FILE, path / PEFT_CONFIG_FILE]
    else:
        raise CheckpointError(
            f"{path} is neither an adalora-deploy checkpoint ({CONFIG_FILE}) nor a PEFT adapter "
            f"({PEFT_CONFIG_FILE}): pass the directory written by `adalora-deploy train` or PEFT's save_pretrained"
        )
    return Source(kind, path, model.requires_grad_(False), files, _tokenizer_dir(path, model), fingerprint, stopped)
