"""The bad-input figures per command, from the suite itself: runs tests/test_bad_input.py and counts,
per command, the cases tried, the clean refusals (exit 2, one `error:` line, no traceback, nothing
written or removed, no temporary left: every assertion of `refuse` passed), the tracebacks and the
partial outputs left (a case that failed on the workspace or TMPDIR check).

    .venv/bin/python -m tests.bad_input_table
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

COMMANDS = ("train", "export", "inspect", "bench", "serve", "demo")


def command_of(test_name: str) -> str | None:
    """test_train_refuses[...] -> train; tests that are not refusal tables (e.g. a diverged run that
    writes its last good state by design) -> None."""
    name = test_name.split("[")[0]
    if "refuse" not in name and "checks_the_port" not in name:
        return None
    return next((c for c in COMMANDS if f"_{c}_" in f"{name}_"), None)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_bad_input.py", f"--junitxml={report}"],
                       check=False, capture_output=True)
        cases = ET.parse(report).getroot().iter("testcase")
        counts = {c: Counter() for c in COMMANDS}
        for case in cases:
            command = command_of(case.get("name"))
            if command is None:
                continue
            failure = case.find("failure")
            text = "" if failure is None else (failure.get("message", "") + (failure.text or ""))
            counts[command]["cases"] += 1
            counts[command]["clean"] += failure is None and case.find("error") is None
            # a traceback on stderr, or an exception that escaped main() instead of an exit code
            counts[command]["tracebacks"] += "Traceback" in text or (bool(text) and "AssertionError" not in text)
            counts[command]["partial"] += "workspace changed" in text or "temporary file" in text
    print("| command | cases | clean refusals | tracebacks | partial outputs left |")
    print("|---|---|---|---|---|")
    for command, n in counts.items():
        print(f"| {command} | {n['cases']} | {n['clean']} | {n['tracebacks']} | {n['partial']} |")
    total = sum(counts.values(), Counter())
    print(f"| all | {total['cases']} | {total['clean']} | {total['tracebacks']} | {total['partial']} |")
    return 0 if total["cases"] == total["clean"] else 1


if __name__ == "__main__":
    sys.exit(main())
