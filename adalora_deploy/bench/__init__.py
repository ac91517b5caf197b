"""`adalora-deploy bench`: latency of the exported graphs and their references, timed interleaved.

A top-layer package (beside the CLI and the demo): it exports checkpoints, runs PyTorch and
opens ONNX Runtime sessions, so it may import every stage; the serving path never imports it.

    from adalora_deploy.bench import BenchConfig, run_bench
    result = run_bench("onnx/", BenchConfig(batch_sizes=[1], seq_lens=[128]), json_path="bench.json")

Modules: run (the timing loop, targets, outputs), variants (the graphs compared), flops (the
adapter branch's FLOP share), markdown (the markdown page and console summary), plots (the PNG).
"""

from .run import BenchConfig, run_bench

__all__ = ["BenchConfig", "run_bench"]
