"""Token generation on a decoder exported with past key values (Optimum's `text-generation-with-past`),
with numpy and ONNX Runtime only.

The loop is the one transformers' generate() runs, so that greedy decoding gives the same tokens:
prompts are left-padded; positions are cumsum(mask) - 1 (1 on padding); the first call feeds the
whole prompt with a past of length 0; every later call feeds one token per row with the returned
`present.*` tensors as the past, and the mask grows by one column. A row that produced EOS keeps
receiving the pad token and is reported as finished. `use_cache=False` recomputes the whole sequence
at every step instead (the baseline the KV cache is measured against).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from adalora_deploy.constants import PAST_PREFIX, PRESENT_PREFIX
from adalora_deploy.errors import ConfigError
from adalora_deploy.ort import empty_past, position_ids


@dataclass
class GenerationConfig:
    """How to pick the next tokens.

    Args:
        max_new_tokens: most tokens generated per prompt (EOS stops a row earlier).
        do_sample: sample from the distribution; False takes the most likely token (greedy).
        temperature: logits are divided by it before sampling (> 0).
        top_p: nucleus sampling: sample among the most likely tokens whose probabilities add up to top_p.
        seed: seed of the sampler (None: a fresh random seed).
        use_cache: feed the past key values back (False recomputes the whole sequence per token).
    """

    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    use_cache: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens ({self.max_new_tokens}) must be >= 1")
        if not self.temperature > 0:
            raise ConfigError(f"temperature ({self.temperature}) must be > 0; use do_sample=false for greedy decoding")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p ({self.top_p}) must be in (0, 1]")


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), both (B, T), padded on the left."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)  # (B, T)
    mask = np.zeros((len(prompts), width), dtype=np.int64)  # (B, T)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return ids, mask


class PredictionCancelled(Exception):
    """A `should_stop` callback said that nobody waits for the result any more (predict, generate)."""


def sample(logits: np.ndarray, config: GenerationConfig, rng: np.random.Generator) -> np.ndarray:
    """The next token per row from last-position logits (B, V): argmax, or a temperature/top-p draw."""
    if not config.do_sample:
        return logits.argmax(axis=-1)
    z = logits.astype(np.float64) / config.temperature
    probs = np.exp(z - z.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)  # (B, V)
    out = np.empty(len(probs), dtype=np.int64)
    for row, p in enumerate(probs):
        order = np.argsort(-p, kind="stable")
        # Keep the smallest set of most likely tokens whose mass reaches top_p (at least one).
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), config.top_p)) + 1]
        out[row] = rng.choice(keep, p=p[keep] / p[keep].sum())
    return out


class Generator:
    """Generates from an OrtSession over a with-past decoder graph.

    Args:
        session: an adalora_deploy.runtime OrtSession (anything with input_names, output_names,
            run(feeds) and an onnxruntime `session` for the input shapes).
        eos_ids: token ids that end a row.
        pad_id: the id fed for padding and for finished rows.
        bind: run steps through an IOBinding that keeps `present.*` where the session runs; None:
            only on CUDA.
    """

    def __init__(self, session, eos_ids: set[int], pad_id: int, bind: bool | None = None):
        self.session = session
        # On CUDA the cache stays on the device between steps (IOBinding). On CPU plain runs are faster
        # (tiny Llama, batch 1: 4,870 against 3,920 tokens/s bound), so binding is the CUDA default only.
        self.bind = getattr(session, "on_cuda", False) if bind is None else bind
        self.eos_ids = set(eos_ids)
        self.pad_id = pad_id
        self.past_names = [n for n in session.input_names if n.startswith(PAST_PREFIX)]
        if not self.past_names:
            raise ConfigError(
                f"{session.path} takes no past key values: export the model with --task causal-lm to generate"
            )
        self.graph_inputs = session.session.get_inputs()

    def _empty_past(self, batch: int) -> dict[str, np.ndarray]:
        return empty_past(self.graph_inputs, batch)

    def _run(self, ids: np.ndarray, mask: np.ndarray, past: dict) -> tuple[np.ndarray, dict]:
        """One step; (last-position logits (B, V), {past input name: array or OrtValue})."""
        if self.bind:
            return self._run_bound(ids, mask, past)
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids(mask)[:, -ids.shape[1]:], **past}
        outputs = self.session.run(feeds)
        present = {PAST_PREFIX + n[len(PRESENT_PREFIX):]: v for n, v in outputs.items() if n.startswith(PRESENT_PREFIX)}
        return outputs["logits"][:, -1], present  # (B, V)

    def _run_bound(self, ids: np.ndarray, mask: np.ndarray, past: dict) -> tuple[np.ndarray, dict]:
        """One step through an IOBinding: the `present.*` outputs stay where the session runs (on the GPU
        under CUDA) as OrtValues and are bound as the next step's past without a round trip through
        numpy; only the logits come back to the host, for sampling.

        Returns:
            (last-position logits (B, V), {past input name: OrtValue}).
        """
        sess = self.session.session
        binding = sess.io_binding()
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids(mask)[:, -ids.shape[1]:]}
        for name in self.session.input_names:
            value = feeds.get(name, past.get(name))
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            else:
                binding.bind_ortvalue_input(name, value)
        device = "cuda" if getattr(self.session, "on_cuda", False) else "cpu"
        for name in self.session.output_names:
            if name.startswith(PRESENT_PREFIX):
                binding.bind_output(name, device, self.session.config.device_id if device == "cuda" else 0)
            else:
                binding.bind_output(name, "cpu")
        sess.run_with_iobinding(binding)
        outputs = dict(zip(self.session.output_names, binding.get_outputs(), strict=True))
        present = {PAST_PREFIX + n[len(PRESENT_PREFIX):]: v for n, v in outputs.items() if n.startswith(PRESENT_PREFIX)}
        return outputs["logits"].numpy()[:, -1], present  # (B, V)

    def stream(self, prompts: list[list[int]], config: GenerationConfig) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (tokens (B,), finished (B,)) once per generated position; finished rows get pad_id.

        Stops after max_new_tokens or when every row has produced an EOS.
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ConfigError("every prompt needs at least one token")
        rng = np.random.default_rng(config.seed)
        ids, mask = left_pad(prompts, self.pad_id)
        done = np.zeros(len(prompts), dtype=bool)
        logits, past = self._run(ids, mask, self._empty_past(len(prompts)))
        for _ in range(config.max_new_tokens):
            tokens = np.where(done, self.pad_id, sample(logits, config, rng))  # (B,)
            done = done | np.isin(tokens, list(self.eos_ids))
            yield tokens, done.copy()
            if done.all():
                return
            ids = np.concatenate([ids, tokens[:, None]], axis=1)
            mask = np.concatenate([mask, np.ones((len(prompts), 1), dtype=np.int64)], axis=1)
            if config.use_cache:
                logits, past = self._run(tokens[:, None], mask, past)
            else:
                logits, _ = self._run(ids, mask, self._empty_past(len(prompts)))

    def generate(
        self, prompts: list[list[int]], config: GenerationConfig, should_stop: Callable[[], bool] | None = None
    ) -> list[dict]:
        """Generated ids per prompt: {"token_ids": [...] (EOS included when reached),
        "finish_reason": "eos" | "length"}. `should_stop` is asked after each step; True raises
        PredictionCancelled."""
        out = [{"token_ids": [], "finish_reason": "length"} for _ in prompts]
        finished = np.zeros(len(prompts), dtype=bool)
        for tokens, done in self.stream(prompts, config):
            if should_stop is not None and should_stop():
                raise PredictionCancelled("nobody waits for this generation any more")
            for row in np.flatnonzero(~finished):
                out[row]["token_ids"].append(int(tokens[row]))
                if done[row]:
                    out[row]["finish_reason"] = "eos"
            finished = done
        return out
