"""The reload fingerprint: what the in-memory model computed on a fixed probe batch when its checkpoint
was saved, so that any gap between the model that was trained and the model that a reload builds
(a module left out of the checkpoint and drawn at random again, a different base) fails loudly
instead of being served (docs/architectures.md).

Written beside the adapter as fingerprint.safetensors: the probe's input_ids and attention_mask and
one tensor per model output (`output.logits`, `output.last_hidden_state`, ...).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .constants import FINGERPRINT_FILE
from .errors import CheckpointError

FINGERPRINT_ATOL = 1e-5
PROBE_SHAPE = (2, 8)  # (B, T); the second row is right-padded to half its length
OUTPUT_PREFIX = "output."


def probe_batch(config) -> dict[str, torch.Tensor]:
    """A fixed batch every model of `config`'s shape accepts: ids spread over the vocabulary (never the pad
    or EOS id), the second row padded."""
    batch, seq = PROBE_SHAPE
    pad = getattr(config, "pad_token_id", None) or 0
    eos = getattr(config, "eos_token_id", None)
    specials = {pad, eos if isinstance(eos, int) else pad}
    allowed = [i for i in range(min(config.vocab_size, 4096)) if i not in specials]
    picks = torch.arange(batch * seq).mul(7919) % len(allowed)  # (B*T,) a fixed spread, no RNG
    ids = torch.tensor(allowed)[picks].reshape(batch, seq)  # (B, T)
    mask = torch.ones(batch, seq, dtype=torch.long)  # (B, T)
    mask[1, seq // 2:] = 0
    return {"input_ids": ids.masked_fill(mask == 0, pad), "attention_mask": mask}


@torch.no_grad()
def model_outputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The float tensors a transformers model returns for `batch` (fp32, CPU), in eval mode."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        outputs = model(**{k: v.to(device) for k, v in batch.items()})
    finally:
        model.train(was_training)
    return {
        f"{OUTPUT_PREFIX}{name}": value.detach().float().cpu().contiguous()
        for name, value in outputs.items() if torch.is_tensor(value) and value.is_floating_point()
    }


def record(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The fingerprint of `model` (a transformers model): the probe batch and its outputs."""
    batch = probe_batch(model.config)
    return {**batch, **model_outputs(model, batch)}


def save(model: torch.nn.Module, directory: Path) -> dict:
    """Write FINGERPRINT_FILE into `directory`; returns its description for the checkpoint config."""
    from safetensors.torch import save_file

    tensors = record(model)
    save_file(tensors, str(directory / FINGERPRINT_FILE))
    outputs = [k[len(OUTPUT_PREFIX):] for k in tensors if k.startswith(OUTPUT_PREFIX)]
    return {"file": FINGERPRINT_FILE, "atol": FINGERPRINT_ATOL, "outputs": outputs}


def compare(model: torch.nn.Module, stored: dict[str, torch.Tensor]) -> dict[str, float]:
    """Max abs difference per output between `model` on the stored probe and the stored outputs."""
    batch = {k: v for k, v in stored.items() if not k.startswith(OUTPUT_PREFIX)}
    got = model_outputs(model, batch)
    diffs = {}
    for key, want in stored.items():
        if not key.startswith(OUTPUT_PREFIX):
            continue
        name = key[len(OUTPUT_PREFIX):]
        if key not in got or got[key].shape != want.shape:
            diffs[name] = float("inf")
        else:
            diffs[name] = float((got[key] - want).abs().max()) if want.numel() else 0.0
    return diffs


def verify(model: torch.nn.Module, checkpoint: Path) -> dict | None:
    """Check that `model`, rebuilt from `checkpoint`, reproduces the fingerprint saved with it.

    Returns:
        {"atol", "max_abs_diff", "outputs"} for the manifest, or None for a checkpoint saved without one.
    Raises:
        CheckpointError naming the outputs that differ by more than FINGERPRINT_ATOL.
    """
    from .io import load_safetensors

    path = Path(checkpoint) / FINGERPRINT_FILE
    if not path.is_file():
        return None
    diffs = compare(model, load_safetensors(path, "reload fingerprint"))
    bad = {k: v for k, v in diffs.items() if not v <= FINGERPRINT_ATOL}
    if bad or not diffs:
        shown = ", ".join(f"{k} max abs diff {v:.3g}" for k, v in bad.items()) or "no outputs recorded"
        raise CheckpointError(
            f"{checkpoint}: the reloaded model does not reproduce the outputs recorded when the checkpoint was "
            f"saved ({shown} > {FINGERPRINT_ATOL:g}), so the served model would not be the trained one; check "
            "--base (it must be the base the checkpoint was trained on) or re-train"
        )
    return {"atol": FINGERPRINT_ATOL, "max_abs_diff": max(diffs.values()), "outputs": sorted(diffs)}
