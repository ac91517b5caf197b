"""Thread-pool sizing: the cores a process may use (affinity, cgroup quota) and training's threads."""

from __future__ import annotations

import os

import pytest
import torch

from adalora_deploy.threads import cgroup_cpu_quota, usable_cores
from adalora_deploy.training import training_threads


def _cgroup(root, version: int, quota: str, period: str = "100000"):
    root.mkdir(exist_ok=True)
    if version == 2:
        (root / "cpu.max").write_text(f"{quota} {period}\n")
    else:
        (root / "cpu").mkdir()
        (root / "cpu" / "cpu.cfs_quota_us").write_text(f"{quota}\n")
        (root / "cpu" / "cpu.cfs_period_us").write_text(f"{period}\n")
    return root


@pytest.mark.parametrize("version, quota, period, cores", [
    (2, "max", "100000", None), (2, "150000", "100000", 1.5), (2, "50000", "100000", 0.5),
    (1, "-1", "100000", None), (1, "200000", "100000", 2.0), (1, "25000", "50000", 0.5),
])
def test_cgroup_quota_in_cores(tmp_path, version, quota, period, cores):
    assert cgroup_cpu_quota(_cgroup(tmp_path, version, quota, period)) == cores


def test_no_or_unreadable_cgroup_means_no_quota(tmp_path):
    assert cgroup_cpu_quota(tmp_path) is None
    (tmp_path / "cpu.max").write_text("garbage\n")
    assert cgroup_cpu_quota(tmp_path) is None


def test_usable_cores_is_the_affinity_capped_by_the_quota(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    assert usable_cores(tmp_path) == affinity  # no cgroup files: the affinity mask alone
    assert usable_cores(_cgroup(tmp_path / "half", 2, "50000")) == 1  # half a core still gets one thread
    assert usable_cores(_cgroup(tmp_path / "big", 2, str(100000 * (affinity + 3)))) == affinity
    assert usable_cores(_cgroup(tmp_path / "one", 1, "100000")) == 1


def test_training_threads_requested_wins_else_torch_capped_at_the_usable_cores():
    before = torch.get_num_threads()
    try:
        assert training_threads(3) == 3
        torch.set_num_threads(1)  # a caller's (or OMP_NUM_THREADS') lower count is kept
        assert training_threads(None) == 1
        torch.set_num_threads(usable_cores() + 4)  # torch counting CPUs the process may not use
        assert training_threads(None) == usable_cores()
    finally:
        torch.set_num_threads(before)
