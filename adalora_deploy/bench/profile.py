"""Per-operator kernel time from ONNX Runtime's profiler, for the benchmark scripts' op tables."""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path

from adalora_deploy.ort import CPU_EP, inference_session


def op_times(path: Path, feeds: dict, options, disabled: list[str] | None = None,
             runs: int = 10) -> tuple[float, dict[str, float]]:
    """(kernel ms per run, {op type: ms per run}, largest first), on the CPU provider.

    Args:
        path: the .onnx file.
        feeds: inputs by name; those the graph does not take are dropped.
        options: onnxruntime.SessionOptions; profiling is turned on here and its trace removed after.
        disabled: graph optimisers to turn off; None: those our CPU sessions turn off.
        runs: profiled runs (averaged).
    """
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(path).with_suffix("")) + "-profile"
    session = inference_session(path, [CPU_EP], options, disabled)
    names = {i.name for i in session.get_inputs()}
    for _ in range(runs):
        session.run(None, {k: v for k, v in feeds.items() if k in names})
    trace = Path(session.end_profiling())
    per_op = collections.Counter()
    for event in json.loads(trace.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"] / 1000 / runs
    os.remove(trace)
    return sum(per_op.values()), dict(per_op.most_common())
