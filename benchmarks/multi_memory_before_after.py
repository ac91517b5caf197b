"""Resident memory of one merged session against one multi session with 16 adapter packs, for two installs
of adalora-deploy (e.g. a checkout before a change and one after), interleaved in rounds of fresh processes.

Each process runs the RSS probe of the install it belongs to (`adalora_deploy.bench.multi.RSS_PROBE`:
session opened, packs loaded, b1 then three b32 s128 runs); the exports and packs are made once, by the
"after" install, with `bench --adapters`'s own export step.

    python benchmarks/multi_memory_before_after.py CKPT --before /path/to/old/.venv/bin/python \\
        --after .venv/bin/python --rounds 3 --json benchmarks/multi_memory.json --markdown benchmarks/multi_memory.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE = ("import subprocess, sys; from adalora_deploy.bench.multi import RSS_PROBE; "
         "sys.exit(subprocess.run([sys.executable, '-c', RSS_PROBE, 'x', sys.argv[1], '1', *sys.argv[2:]]).returncode)")


def probe(python: str, model_dir: Path, packs: list[Path]) -> float:
    out = subprocess.run([python, "-c", PROBE, str(model_dir), *map(str, packs)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["rss_mib"]


def main() -> None:
    from adalora_deploy.bench.multi import _export_all
    from adalora_deploy.bench.run import write_script_outputs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--before", required=True, help="python of the install before the change")
    parser.add_argument("--after", default=sys.executable, help="python of the install after the change")
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    runs: dict[str, dict[str, list[float]]] = {"before": {"merged": [], "multi": []}, "after": {"merged": [], "multi": []}}
    with tempfile.TemporaryDirectory(prefix="adalora-multi-memory-") as tmp:
        dirs = _export_all(args.checkpoint, Path(tmp), args.adapters)
        for _ in range(args.rounds):
            for who, python in (("before", args.before), ("after", args.after)):
                runs[who]["merged"].append(probe(python, dirs["merged"] / "merged", []))
                runs[who]["multi"].append(probe(python, dirs["multi"], dirs["packs"]))
    result = {"command": "python " + " ".join(sys.argv), "adapters": args.adapters, "runs_mib": runs}
    for who, r in runs.items():
        merged, multi = statistics.median(r["merged"]), statistics.median(r["multi"])
        result[who] = {"merged_mib": merged, "multi_mib": multi, "ratio": round(multi / merged, 3)}
    lines = [f"# Resident memory: one merged session vs one multi session with {args.adapters} packs", "",
             f"Command: `{result['command']}`", "", __doc__.split("\n\n    python")[0], "",
             "| install | merged MiB (median) | multi MiB (median) | multi / merged | all merged | all multi |",
             "|---|---|---|---|---|---|"]
    for who in ("before", "after"):
        r = result[who]
        lines.append(f"| {who} | {r['merged_mib']:.1f} | {r['multi_mib']:.1f} | {r['ratio']:.3f} "
                     f"| {[round(x, 1) for x in runs[who]['merged']]} | {[round(x, 1) for x in runs[who]['multi']]} |")
    print("\n".join(lines))
    write_script_outputs(result, "\n".join(lines) + "\n", args.json, args.markdown)


if __name__ == "__main__":
    main()
