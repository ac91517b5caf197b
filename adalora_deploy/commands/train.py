"""`adalora-deploy train`: fine-tune a sequence classifier with AdaLoRA and write a checkpoint."""

from __future__ import annotations

import argparse

from ..constants import CAUSAL_LM, QUESTION_ANSWERING, TOKEN_CLASSIFICATION
from ..flags import add_config_flags, add_flags_later, config_kwargs


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train", help="fine-tune with AdaLoRA and write a checkpoint",
        description="Fine-tune a model for --task (sequence classification by default) with AdaLoRA: SVD adapters "
        "whose ranks are re-allocated by importance on a cubic budget schedule.",
    )
    return add_flags_later(p, add_flags)


def add_flags(p: argparse.ArgumentParser) -> None:
    from ..train_config import TrainConfig

    add_config_flags(p, TrainConfig)


def run(args: argparse.Namespace) -> int:
    from ..extras import require

    require("train", "train")
    from ..training import TrainConfig, train

    result = train(**config_kwargs(args, TrainConfig))
    if result.rank != 0:
        return 0  # under torchrun, rank 0 reports
    budget = sum(result.model.ranks().values())
    what = {TOKEN_CLASSIFICATION: "token accuracy", QUESTION_ANSWERING: "exact span accuracy",
            CAUSAL_LM: "next-token accuracy"}.get(args.task, "accuracy")
    print(f"eval {what}: {result.eval_accuracy:.4f} on {result.eval_examples} examples ({result.eval_source})")
    print(f"final budget: {budget} triplets over {len(result.model.adapters)} modules; "
          f"trained {len(result.losses)} steps in {result.train_seconds:.1f} s")
    print(f"checkpoint: {result.checkpoint}")
    return 0
