"""How many cores this process may really use, to size thread pools (README, "Threads").

os.cpu_count() counts the machine's CPUs; a process pinned by taskset or a cpuset, or limited by a
cgroup CPU quota (docker --cpus, Kubernetes CPU limits), may use fewer. A pool larger than that puts
threads in each other's way: every parallel region waits at its barrier for a thread that has no
core. Torch-free, so the serving path may use it too.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cores(cgroup_root: Path = CGROUP_ROOT) -> int:
    """The CPUs of this process's affinity mask, capped by its cgroup's CPU quota (rounded up); >= 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity API (macOS)
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota in cores: cgroup v2's cpu.max ("QUOTA PERIOD" or "max PERIOD"), else v1's
    cpu/cpu.cfs_quota_us over cpu/cpu.cfs_period_us (-1: none). None when unlimited or unreadable."""
    try:
        if (root / "cpu.max").is_file():
            quota, period = (root / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        v1 = root / "cpu"
        if (v1 / "cpu.cfs_quota_us").is_file():
            quota = int((v1 / "cpu.cfs_quota_us").read_text())
            return None if quota <= 0 else quota / int((v1 / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None
