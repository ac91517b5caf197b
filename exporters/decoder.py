"""Validation inputs and references for decoders exported with past key values (Optimum's
`text-generation-with-past`): one graph serves the first step (an empty past) and every later one.

Each case is checked twice, as generation uses the graph:
- prefill: the whole left-padded prompt with a past of length 0;
- decode: the last NEW_TOKENS tokens, with the past that the PyTorch model computed for the rest.
Positions are computed from the attention mask the way transformers' generate() does, and only the
logits of real (unpadded) tokens are compared: a left-padded position attends to nothing, and its
logits are never used.
"""

from __future__ import annotations

import numpy as np
import torch

from adalora_deploy.constants import PAST_PREFIX
from adalora_deploy.ort import empty_past, position_ids

from .validate import CASES, InputCase, Probe, make_inputs

NEW_TOKENS = 3  # tokens fed with a past in the decode check


def past_names(input_names: list[str]) -> list[str]:
    return [n for n in input_names if n.startswith(PAST_PREFIX)]


def prefill_inputs(case: InputCase, config, runner, seed: int) -> dict[str, np.ndarray]:
    """A left-padded batch (positions from its mask) with an empty past."""
    text = [n for n in runner.input_names if not n.startswith(PAST_PREFIX)]
    return {**make_inputs(case, config, text, seed=seed), **empty_past(runner.session.get_inputs(), case.batch)}


@torch.no_grad()
def _logits(module: torch.nn.Module, inputs: dict[str, np.ndarray], cache=None):
    tensors = {k: torch.from_numpy(v) for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
    return module(**tensors, past_key_values=cache, use_cache=True)


def _masked(logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.where(mask[..., None] == 1, logits, 0.0).astype(np.float32)  # (B, T, V)


def prefill_reference(module: torch.nn.Module, inputs: dict[str, np.ndarray]) -> np.ndarray:
    return _masked(_logits(module, inputs).logits.float().numpy(), inputs["attention_mask"])


def decode_case(module: torch.nn.Module, prefill: dict[str, np.ndarray], input_names: list[str]) -> dict:
    """Split a prefill batch into a prefix (run by `module` to get its past) and NEW_TOKENS new tokens.

    Returns:
        {"inputs": the graph's feeds for the new tokens (the past as numpy), "mask": the new tokens' mask}.
    """
    from transformers import DynamicCache

    ids, mask = prefill["input_ids"], prefill["attention_mask"]
    cut = ids.shape[1] - NEW_TOKENS
    prefix = {"input_ids": ids[:, :cut], "attention_mask": mask[:, :cut], "position_ids": position_ids(mask)[:, :cut]}
    cache = _logits(module, prefix).past_key_values
    legacy = cache.to_legacy_cache() if isinstance(cache, DynamicCache) else cache
    past = {}
    for layer, (key, value) in enumerate(legacy):
        past[f"{PAST_PREFIX}{layer}.key"] = key.float().numpy()
        past[f"{PAST_PREFIX}{layer}.value"] = value.float().numpy()
    feeds = {"input_ids": ids[:, cut:], "attention_mask": mask, "position_ids": position_ids(mask)[:, cut:], **past}
    return {"inputs": {n: feeds[n] for n in input_names}, "mask": mask[:, cut:]}


def decode_reference(module: torch.nn.Module, case: dict) -> np.ndarray:
    from transformers import DynamicCache

    inputs = case["inputs"]
    layers = len(past_names(list(inputs))) // 2
    legacy = tuple(
        (torch.from_numpy(inputs[f"{PAST_PREFIX}{i}.key"]), torch.from_numpy(inputs[f"{PAST_PREFIX}{i}.value"]))
        for i in range(layers)
    )
    logits = _logits(module, inputs, DynamicCache.from_legacy_cache(legacy)).logits
    return _masked(logits.float().numpy(), case["mask"])


def decoder_probes(config, runner, reference_module: torch.nn.Module) -> list[Probe]:
    """A prefill and a decode probe per left-padded case of CASES (decoders generate left-padded).

    `reference_module` computes the past fed to the decode probes, so that every compared model
    continues from the same past.
    """
    probes = []
    for i, base in enumerate(CASES):
        case = InputCase(base.batch, max(base.seq, NEW_TOKENS + 2), "left")
        feeds = prefill_inputs(case, config, runner, seed=i)
        mask = feeds["attention_mask"]
        probes.append(Probe(case, feeds, lambda m, x=feeds: {"logits": prefill_reference(m, x)},
                            lambda out, k=mask: {"logits": _masked(out["logits"], k)}))
        step = decode_case(reference_module, feeds, runner.input_names)
        decode = InputCase(case.batch, case.seq, f"left, last {NEW_TOKENS} tokens after a past")
        probes.append(Probe(decode, step["inputs"], lambda m, s=step: {"logits": decode_reference(m, s)},
                            lambda out, k=step["mask"]: {"logits": _masked(out["logits"], k)}))
    return probes
