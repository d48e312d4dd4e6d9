"""How many CPUs this process may really use, which is what thread pools should be sized by.

`os.cpu_count()` counts the host's CPUs. A container or a pinned process may use fewer: its affinity
mask (taskset, Kubernetes' static CPU manager) and its cgroup's CPU quota (a pod's CPU limit). Threads
beyond those only wait for each other.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """The affinity mask's size, bounded by the cgroup CPU quota (rounded up) when there is one."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota(cgroup_root)
    return max(1, min(count, math.ceil(quota))) if quota is not None else count


def cgroup_cpu_quota(cgroup_root: Path = CGROUP_ROOT) -> float | None:
    """CPUs' worth of time the cgroup may use per period (cgroup v2 `cpu.max`, else v1's CFS files);
    None when unlimited or unknown."""
    try:
        quota, period = (cgroup_root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((cgroup_root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((cgroup_root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period
