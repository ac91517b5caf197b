"""What handing a batch's memory back costs when every call is that large.

Times one ONNX Runtime session on full batches (default 32 x 128, MiniLM-sized) in alternating blocks:
calls that keep ONNX Runtime's arena, and calls that release it when they end (what a call over
RELEASE_MEMORY_TOKENS does: arena shrinkage + malloc_trim), so each of those grows the arena again.
The first call of each block is not timed (it pays for the other block's state).

    .venv/bin/python benchmarks/release_cost.py EXPORT_DIR/merged --blocks 10 --markdown benchmarks/release_cost.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from adalora_deploy.io import write_text_atomic
from adalora_deploy.runtime.session import RELEASE_MEMORY_TOKENS, SessionConfig, open_session


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a mode directory (model.onnx)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--blocks", type=int, default=10, help="blocks, alternating keep and release")
    p.add_argument("--per-block", type=int, default=4, help="timed calls per block")
    p.add_argument("--markdown", help="write the result as markdown")
    args = p.parse_args(argv)
    session = open_session(args.model, SessionConfig(provider="cpu", intra_op_threads=1, inter_op_threads=1,
                                                     spinning=False))
    feeds = session.dummy_feeds((args.batch, args.seq))
    feeds["input_ids"] = np.random.default_rng(0).integers(1000, 30000, size=(args.batch, args.seq), dtype=np.int64)
    times: dict[bool, list[float]] = {False: [], True: []}
    for block in range(args.blocks):
        release = bool(block % 2)
        session.run(feeds, release_memory=release)
        for _ in range(args.per_block):
            start = time.perf_counter()
            session.run(feeds, release_memory=release)
            times[release].append(time.perf_counter() - start)
    keep, rel = statistics.median(times[False]), statistics.median(times[True])
    line = (f"{args.batch} x {args.seq} ({args.batch * args.seq} padded tokens; release threshold "
            f"{RELEASE_MEMORY_TOKENS}), 1 thread, {len(times[True])} timed calls each: keep p50 {keep * 1e3:.1f} ms, "
            f"release p50 {rel * 1e3:.1f} ms, release / keep {rel / keep:.3f}")
    print(line)
    if args.markdown:
        command = "python benchmarks/release_cost.py " + " ".join(sys.argv[1:] if argv is None else argv)
        write_text_atomic(args.markdown, f"# Releasing memory after every full batch\n\n- command: `{command}`\n"
                          f"- date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}\n\n{line}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
