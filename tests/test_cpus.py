"""Thread pools are sized by the CPUs a process may use: its affinity mask and its cgroup's CPU quota."""

from __future__ import annotations

import os
from pathlib import Path

from shared.platform.cpus import cgroup_cpu_quota, usable_cpus


def test_a_cgroup_v2_quota_of_one_and_a_half_cpus_allows_two_threads(tmp_path: Path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_quota(tmp_path) == 1.5
    assert usable_cpus(tmp_path) == min(2, len(os.sched_getaffinity(0)))


def test_an_unlimited_cgroup_leaves_the_affinity_mask(tmp_path: Path):
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(tmp_path) is None
    assert usable_cpus(tmp_path) == len(os.sched_getaffinity(0))


def test_a_cgroup_v1_quota_is_read_too(tmp_path: Path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cpus(tmp_path) == 1


def test_the_affinity_mask_bounds_the_count():
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(before)})
        assert usable_cpus(Path("/nonexistent")) == 1
    finally:
        os.sched_setaffinity(0, before)
