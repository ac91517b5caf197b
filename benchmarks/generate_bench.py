"""Generation throughput of a causal LM: ONNX Runtime merged vs factored vs PyTorch generate(), and the
KV-cache path vs recomputing the whole sequence for every new token.

A random-weight Llama of the chosen --size is built from its config (nothing is downloaded), given
AdaLoRA adapters at init_r 12 with random lam and masks that keep target_r 4 triplets per module on
average, saved as a checkpoint and exported by `adalora_deploy.exporters.export` with --prune-ranks
(merged and factored, with past key values). Then, for each batch size, greedy generation of
--new-tokens tokens after a --prompt-length-token prompt is timed for:

  ort-merged            the merged graph, KV cache (adalora_deploy.runtime.generate.Generator)
  ort-factored          the factored graph (pruned low-rank branches), KV cache
  ort-merged-recompute  the merged graph, the whole sequence recomputed at every step (no cache)
  ort-factored-recompute
  pytorch               transformers' generate() on the adapted model as trained (SVD adapter layers)
  pytorch-merged        transformers' generate() on the model with the adapters merged into W0

EOS is ignored (every row produces exactly --new-tokens tokens), so all variants do the same work.
The variants are interleaved in every round (the order rotates), after --warmup untimed rounds; the
report gives medians and quartiles of the seconds per generate call, tokens/s = batch * new tokens /
median seconds, and ratios to `pytorch`. Greedy tokens of the ONNX variants are checked against
PyTorch's on the first batch and the agreement is recorded (fp16 on CUDA may differ by ties).

CPU (the committed figures):
    .venv/bin/python benchmarks/generate_bench.py --size small --rounds 5 --out benchmarks/generate_cpu_small
    .venv/bin/python benchmarks/generate_bench.py --size tiny --rounds 7 --out benchmarks/generate_cpu_tiny
GPU (one command; needs onnxruntime-gpu and a CUDA torch; --size 350m is sized to finish within about
3 minutes on one H200, --size 1b takes TinyLlama-1.1B's shape and longer to export; not yet run):
    python benchmarks/generate_bench.py --device cuda --size 350m --out benchmarks/generate_cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adalora_deploy.constants import CAUSAL_LM, MANIFEST_FILE

# Llama shapes: (hidden, layers, heads, kv heads, intermediate, vocab).
SIZES = {
    "tiny": (64, 2, 4, 2, 128, 512),
    "small": (256, 4, 8, 4, 688, 8192),
    "350m": (1024, 24, 16, 8, 2816, 32000),
    "1b": (2048, 22, 32, 4, 5632, 32000),  # TinyLlama-1.1B's shape
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
INIT_R, TARGET_R, ALPHA = 12, 4, 32.0
VARIANTS = ("ort-merged", "ort-factored", "ort-merged-recompute", "ort-factored-recompute", "pytorch",
            "pytorch-merged")


def build_tokenizer(vocab: int):
    """A word-level tokenizer over `vocab` made-up words: the export needs tokenizer files, while the
    benchmark feeds random token ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<eos>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>", unk_token="<unk>")


def build_checkpoint(size: str, out: Path, seed: int = 0) -> Path:
    """Random Llama of `size` + AdaLoRA adapters with masks keeping TARGET_R triplets on average."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from adalora_deploy.config import AdaLoraConfig
    from adalora_deploy.model import AdaLoraModel

    hidden, layers, heads, kv, inter, vocab = SIZES[size]
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
                         max_position_embeddings=512, eos_token_id=0, pad_token_id=0, bos_token_id=0)
    base_dir = out / "base"
    LlamaForCausalLM(config).save_pretrained(base_dir)
    tokenizer = build_tokenizer(vocab)
    tokenizer.save_pretrained(base_dir)
    model = AdaLoraModel(LlamaForCausalLM.from_pretrained(base_dir), AdaLoraConfig(
        target_modules=TARGETS, init_r=INIT_R, target_r=TARGET_R, alpha=ALPHA), CAUSAL_LM,
        {"name_or_path": str(base_dir), "revision": None})
    rng = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.adapters.values():
            keep = int(torch.randint(0, 2 * TARGET_R + 1, (1,), generator=rng))  # mean TARGET_R
            m.mask.zero_()
            m.mask[torch.randperm(INIT_R, generator=rng)[:keep]] = True
            m.lam.copy_(torch.randn(INIT_R, generator=rng) * 0.5 * m.mask)
    model.save_pretrained(out / "ckpt", tokenizer=tokenizer)
    return out / "ckpt"


@dataclass
class Runner:
    """One variant: a callable generating from (B, T) prompt ids; returns the new ids (B, N)."""

    name: str
    run: object


def ort_runner(name: str, model_dir: Path, device: str, threads: int, new_tokens: int, use_cache: bool) -> Runner:
    from adalora_deploy.runtime.generate import GenerationConfig, Generator
    from adalora_deploy.runtime.session import SessionConfig, open_session

    session = open_session(model_dir, SessionConfig(provider=device, intra_op_threads=threads))
    generator = Generator(session, eos_ids=set(), pad_id=0)  # no EOS: exactly new_tokens per row
    config = GenerationConfig(max_new_tokens=new_tokens, use_cache=use_cache)

    def run(prompts: np.ndarray) -> np.ndarray:
        return np.stack([tokens for tokens, _ in generator.stream(prompts.tolist(), config)], axis=1)

    return Runner(name, run)


def torch_runner(name: str, model: torch.nn.Module, device: str, new_tokens: int) -> Runner:
    dtype = torch.float16 if device == "cuda" else torch.float32
    model = model.to(device=device, dtype=dtype).eval()

    @torch.no_grad()
    def run(prompts: np.ndarray) -> np.ndarray:
        ids = torch.from_numpy(prompts).to(device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        if device == "cuda":
            torch.cuda.synchronize()
        return out[:, ids.shape[1]:].cpu().numpy()

    return Runner(name, run)


def build_runners(ckpt: Path, export_root: Path, args) -> list[Runner]:
    from adalora_deploy.layers import merge_adapters
    from adalora_deploy.model import AdaLoraModel

    provider = "cuda" if args.device == "cuda" else "cpu"
    runners = []
    for mode in ("merged", "factored"):
        runners.append(ort_runner(f"ort-{mode}", export_root / mode, provider, args.threads, args.new_tokens, True))
    for mode in ("merged", "factored"):
        runners.append(ort_runner(f"ort-{mode}-recompute", export_root / mode, provider, args.threads,
                                  args.new_tokens, False))
    adapted = AdaLoraModel.from_pretrained(ckpt).eval()
    runners.append(torch_runner("pytorch", adapted.model, args.device, args.new_tokens))
    runners.append(torch_runner("pytorch-merged", merge_adapters(adapted.model), args.device, args.new_tokens))
    return runners


def time_variants(runners: list[Runner], prompts: np.ndarray, rounds: int, warmup: int) -> dict[str, list[float]]:
    seconds = {r.name: [] for r in runners}
    for round_ in range(warmup + rounds):
        shift = round_ % len(runners)
        for r in runners[shift:] + runners[:shift]:  # rotate the order every round
            start = time.perf_counter()
            r.run(prompts)
            if round_ >= warmup:
                seconds[r.name].append(time.perf_counter() - start)
    return seconds


def summarise(seconds: dict[str, list[float]], batch: int, new_tokens: int) -> list[dict]:
    base = statistics.median(seconds["pytorch"])
    rows = []
    for name, values in seconds.items():
        q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        median = statistics.median(values)
        rows.append({"variant": name, "batch": batch, "median_s": median, "p25_s": q[0], "p75_s": q[2],
                     "tokens_per_s": batch * new_tokens / median, "speedup_vs_pytorch": base / median})
    return rows


def agreement(runners: list[Runner], prompts: np.ndarray) -> dict[str, float]:
    """Fraction of greedy tokens each variant shares with `pytorch` on the same prompts."""
    outputs = {r.name: r.run(prompts) for r in runners}
    want = outputs["pytorch"]
    return {name: float((got == want).mean()) for name, got in outputs.items() if name != "pytorch"}


def environment(args) -> dict:
    import onnxruntime

    env = {"python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
           "cpu_count": os.cpu_count(), "threads": args.threads, "loadavg": os.getloadavg()}
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def markdown(report: dict) -> str:
    cfg = report["config"]
    lines = [
        f"# Generation throughput: {cfg['size']} Llama on {cfg['device']}",
        "",
        "Command:",
        "",
        f"```\n{report['command']}\n```",
        "",
        f"Llama {cfg['size']} {tuple(cfg['shape'])} (hidden, layers, heads, kv heads, intermediate, vocab), "
        f"{cfg['params']:,} parameters; AdaLoRA on {', '.join(TARGETS)}, init_r {INIT_R} -> pruned ranks "
        f"{cfg['ranks_after']} triplets in all; prompt {cfg['prompt_length']} tokens, {cfg['new_tokens']} new "
        f"tokens, greedy, EOS ignored; {cfg['rounds']} interleaved rounds after {cfg['warmup']} warm-up. "
        f"Environment: {json.dumps(report['environment'])}.",
        "",
        "| batch | variant | tokens/s | median s | p25 s | p75 s | x pytorch |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(f"| {r['batch']} | {r['variant']} | {r['tokens_per_s']:.1f} | {r['median_s']:.4f} | "
                     f"{r['p25_s']:.4f} | {r['p75_s']:.4f} | {r['speedup_vs_pytorch']:.2f} |")
    lines += ["", "KV cache vs recomputing the sequence per token (median seconds, recompute / cache):", ""]
    lines += [f"- batch {k}: {v}" for k, v in report["kv_cache_speedup"].items()]
    lines += ["", f"Greedy-token agreement with `pytorch` (batch 1): {json.dumps(report['agreement'])}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=tuple(SIZES), default="small")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--prompt-length", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime intra-op threads on CPU")
    p.add_argument("--out", required=True, help="output prefix: writes OUT.json and OUT.md")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)

    from adalora_deploy.exporters import export
    from adalora_deploy.io import atomic_write

    outputs = [Path(args.out + ".json"), Path(args.out + ".md")]
    if any(o.exists() for o in outputs) and not args.overwrite:
        print(f"error: {args.out}.json/.md exist: pass --overwrite or another --out", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no GPU: run on a GPU machine or use --device cpu", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_checkpoint(args.size, Path(tmp))
        dtype = "fp16" if args.device == "cuda" else "fp32"
        root = export(ckpt, Path(tmp) / "onnx", prune_ranks=True, optimize=False, dtype=dtype)
        manifest = json.loads((root / "factored" / MANIFEST_FILE).read_text())
        runners = build_runners(ckpt, root, args)
        rng = np.random.default_rng(0)
        vocab = SIZES[args.size][5]
        results, kv = [], {}
        for batch in map(int, args.batch_sizes.split(",")):
            prompts = rng.integers(1, vocab, (batch, args.prompt_length), dtype=np.int64)
            rows = summarise(time_variants(runners, prompts, args.rounds, args.warmup), batch, args.new_tokens)
            results += rows
            by = {r["variant"]: r["median_s"] for r in rows}
            kv[batch] = {m: round(by[f"ort-{m}-recompute"] / by[f"ort-{m}"], 3) for m in ("merged", "factored")}
            print(f"batch {batch}: " + ", ".join(f"{r['variant']} {r['tokens_per_s']:.1f} tok/s" for r in rows))
        agree = agreement(runners, rng.integers(1, vocab, (1, args.prompt_length), dtype=np.int64))
    report = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "config": {"size": args.size, "shape": SIZES[args.size], "device": args.device,
                   "params": _param_count(args.size),
                   "ranks_after": sum(manifest["ranks_after"].values()), "prompt_length": args.prompt_length,
                   "new_tokens": args.new_tokens, "rounds": args.rounds, "warmup": args.warmup, "dtype": dtype},
        "environment": environment(args), "results": results, "kv_cache_speedup": kv, "agreement": agree,
    }
    atomic_write(outputs[0], lambda t: t.write_text(json.dumps(report, indent=2) + "\n"))
    atomic_write(outputs[1], lambda t: t.write_text(markdown(report)))
    print(f"wrote {outputs[0]} and {outputs[1]}")
    return 0


def _param_count(size: str) -> int:
    hidden, layers, heads, kv, inter, vocab = SIZES[size]
    head_dim = hidden // heads
    attention = 2 * hidden * hidden + 2 * hidden * kv * head_dim
    per_layer = attention + 3 * hidden * inter + 2 * hidden
    return layers * per_layer + 2 * vocab * hidden + hidden


if __name__ == "__main__":
    sys.exit(main())
