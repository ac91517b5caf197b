"""Launched by tests/test_ddp.py under `torch.distributed.run` (2 processes, gloo, CPU): trains a tiny
model through `train()` and dumps what this rank ended with, for the test to compare across ranks.

Usage: python -m torch.distributed.run --standalone --nproc-per-node 2 tests/ddp_worker.py MODEL DATA OUT
"""

import json
import sys
from pathlib import Path

from safetensors.torch import save_file

from adalora_deploy.training import train


def main(model_dir: str, data: str, out: str) -> None:
    out = Path(out)
    result = train(
        progress=False, model=model_dir, data=data, steps=12, batch_size=8, lr=1e-2, init_r=4, target_r=2,
        tinit=2, tfinal=3, delta_t=1, out=str(out / "checkpoint"),
    )
    state = {f"{name}.{key}": getattr(m, key).detach().clone() for name, m in result.model.adapters.items()
             for key in ("mask", "lam", "P", "Q")}
    state["scores"] = result.allocator.scores()
    save_file(state, str(out / f"rank{result.rank}.safetensors"))
    report = {"world_size": result.world_size, "losses": result.losses, "budgets": result.budgets}
    (out / f"rank{result.rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:])
