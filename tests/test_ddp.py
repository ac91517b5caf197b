"""Under torchrun (gloo, CPU), every rank ends with identical masks: the allocator runs after
backward, on gradients DDP has already all-reduced, so equal gradients give equal scores."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .test_training import separable_rows, write_rows

WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.mark.slow
def test_two_ranks_end_with_identical_masks(tmp_path, tiny_bert_dir):
    data = write_rows(tmp_path / "data.csv", separable_rows(200))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(WORKER), str(tiny_bert_dir), data, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]

    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    logs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [log["world_size"] for log in logs] == [2, 2]
    # Different data per rank: the local (pre-all-reduce) losses differ ...
    assert logs[0]["losses"] != logs[1]["losses"]
    # ... yet scores, masks, lam and the factors are bit-identical across ranks.
    assert ranks[0].keys() == ranks[1].keys()
    assert torch.equal(ranks[0]["scores"], ranks[1]["scores"])
    for kind in (".mask", ".lam", ".P", ".Q"):
        for key in (k for k in ranks[0] if k.endswith(kind)):
            assert torch.equal(ranks[0][key], ranks[1][key]), key
    masks = {k: v for k, v in ranks[0].items() if k.endswith(".mask")}
    assert sum(int(m.sum()) for m in masks.values()) == 2 * len(masks)  # target_r x modules, exactly
    assert logs[0]["budgets"][-1] == 2 * len(masks)

    saved = load_file(str(tmp_path / "checkpoint" / "adapter.safetensors"))  # written by rank 0 only
    for key, mask in masks.items():
        assert torch.equal(saved[key], mask), key
