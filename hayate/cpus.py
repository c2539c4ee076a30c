"""The CPUs this process may use: the fewest of its affinity mask, its cgroup's CPU quota and
the CPUs online. hayate's default thread count is that number (at most one per physical core,
as PyTorch's own default), not the machine's: a thread more than the CPUs it is given waits
its turn while its partners spin at the next barrier."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
CPU_SYSFS = Path("/sys/devices/system/cpu")
# where each hierarchy is mounted under the root: v2 (alone, or beside v1 as "unified"), v1's cpu
V2_MOUNTS = ("", "unified")
V1_CPU_MOUNTS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")


@dataclass(frozen=True)
class CpuBudget:
    affinity: int | None        # CPUs in this process's affinity mask; None where the OS has no such call
    quota: float | None         # CPUs' worth of time per period the cgroup allows; None: no quota
    online: int                 # os.cpu_count()
    cores: int | None = None    # physical cores under the affinity mask; None: unknown

    @property
    def count(self) -> int:
        """The usable CPUs: a fractional quota rounded up (1.5 CPUs of time spread over 2)."""
        limits = [self.online, self.affinity, math.ceil(self.quota) if self.quota else None]
        return max(1, min(limit for limit in limits if limit))

    @property
    def threads(self) -> int:
        """The default thread count: one per usable CPU, but no two on one core's SMT siblings."""
        return min(self.count, self.cores or self.count)

    def describe(self) -> str:
        """e.g. "2 CPUs (affinity 2, cgroup quota none, 4 online, 2 cores)"."""
        quota = "none" if self.quota is None else f"{self.quota:g}"
        affinity = "unknown" if self.affinity is None else str(self.affinity)
        cores = "" if self.cores is None else f", {self.cores} core{'' if self.cores == 1 else 's'}"
        return (f"{self.count} CPU{'' if self.count == 1 else 's'} (affinity {affinity}, cgroup quota {quota}, "
                f"{self.online} online{cores})")


def usable_cpus(root: Path = CGROUP_ROOT, membership: str | None = None, sysfs: Path = CPU_SYSFS) -> CpuBudget:
    """This process's CPU budget; `root` and `membership` (the text of /proc/self/cgroup) as
    for cgroup_quota, `sysfs` as for physical_cores."""
    online = os.cpu_count() or 1
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return CpuBudget(None if cpus is None else len(cpus), cgroup_quota(root, membership), online,
                     physical_cores(range(online) if cpus is None else cpus, sysfs))


def thread_count(requested: int | None) -> int:
    """The threads hayate runs with: those asked for, else CpuBudget.threads."""
    return requested or usable_cpus().threads


def physical_cores(cpus: Iterable[int], sysfs: Path = CPU_SYSFS) -> int | None:
    """How many physical cores `cpus` span: CPUs with the same SMT sibling list share one.
    None where a CPU's topology cannot be read."""
    cores = set()
    for cpu in cpus:
        siblings = _read(sysfs / f"cpu{cpu}" / "topology" / "thread_siblings_list")
        if siblings is None:
            return None
        cores.add(siblings)
    return len(cores) or None


def cgroup_quota(root: Path = CGROUP_ROOT, membership: str | None = None) -> float | None:
    """The tightest CPU quota, in CPUs, along this process's cgroup and its parents up to the
    mount (cgroup v2 cpu.max, v1 cpu.cfs_quota_us / cpu.cfs_period_us); None: no quota or no
    cgroup files. `membership`: the text of /proc/self/cgroup (read when None)."""
    if membership is None:
        membership = _read(PROC_CGROUP) or ""
    quotas = [quota for folder in cgroup_folders(root, membership) if (quota := folder_quota(folder)) is not None]
    return min(quotas, default=None)


def cgroup_folders(root: Path, membership: str) -> list[Path]:
    """The folders that may limit this process: its cgroup's path under each mount that could
    hold its hierarchy, and every parent up to that mount (in a container the path names the
    host's cgroup, absent in the container's view: the mount itself is the container's own)."""
    paths = {"v2": "/", "v1": "/"}
    for line in membership.splitlines():
        _, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if controllers == "":
            paths["v2"] = path or "/"
        elif "cpu" in controllers.split(","):
            paths["v1"] = path or "/"
    folders = [folder for mount in V2_MOUNTS for folder in _ancestors(root / mount, paths["v2"])]
    folders += [folder for mount in V1_CPU_MOUNTS for folder in _ancestors(root / mount, paths["v1"])]
    return [folder for folder in dict.fromkeys(folders) if folder.is_dir()]


def folder_quota(folder: Path) -> float | None:
    """One cgroup folder's quota in CPUs: cpu.max (v2), else the cfs pair (v1)."""
    cpu_max = _read(folder / "cpu.max")
    if cpu_max is not None:
        fields = cpu_max.split()
        return _quota(fields[0], fields[1]) if len(fields) == 2 else None
    quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
    return _quota(quota, period) if quota is not None and period is not None else None


def _quota(quota: str, period: str) -> float | None:
    """quota / period in CPUs; "max" (v2) or -1 (v1) means no limit."""
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def _ancestors(mount: Path, path: str) -> list[Path]:
    """mount/path, then each parent folder up to mount itself."""
    parts = [part for part in path.split("/") if part and part != ".."]
    return [mount.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None
