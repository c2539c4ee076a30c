"""hayate/cpus.py: the usable CPUs from affinity, cgroup quota (v2 and v1, read from a fake
cgroup folder) and the CPUs online."""
from __future__ import annotations

import os
from pathlib import Path

from hayate.cpus import CpuBudget, cgroup_quota, physical_cores, thread_count, usable_cpus

CONTAINER = "0::/\n"     # /proc/self/cgroup inside a container: the mount is its own cgroup


def write(folder: Path, files: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text + "\n")


def test_v2_quota_is_rounded_up(tmp_path):
    write(tmp_path, {"cpu.max": "150000 100000"})
    assert cgroup_quota(tmp_path, CONTAINER) == 1.5
    assert CpuBudget(affinity=4, quota=1.5, online=8).count == 2


def test_v2_max_is_no_limit(tmp_path):
    write(tmp_path, {"cpu.max": "max 100000"})
    assert cgroup_quota(tmp_path, CONTAINER) is None
    assert CpuBudget(affinity=4, quota=None, online=8).count == 4


def test_v1_cfs_files(tmp_path):
    write(tmp_path / "cpu", {"cpu.cfs_quota_us": "300000", "cpu.cfs_period_us": "100000"})
    assert cgroup_quota(tmp_path, "2:cpu,cpuacct:/\n0::/\n") == 3.0
    write(tmp_path / "cpu", {"cpu.cfs_quota_us": "-1"})
    assert cgroup_quota(tmp_path, "2:cpu,cpuacct:/\n") is None


def test_missing_files_are_no_limit(tmp_path):
    assert cgroup_quota(tmp_path, CONTAINER) is None
    assert cgroup_quota(tmp_path / "absent", "") is None
    write(tmp_path, {"cpu.max": "garbage"})
    assert cgroup_quota(tmp_path, CONTAINER) is None


def test_the_tightest_quota_along_the_path_wins(tmp_path):
    write(tmp_path / "box.slice", {"cpu.max": "200000 100000"})
    write(tmp_path / "box.slice" / "job", {"cpu.max": "max 100000"})
    assert cgroup_quota(tmp_path, "0::/box.slice/job\n") == 2.0


def test_a_host_path_absent_in_the_container_falls_back_to_the_mount(tmp_path):
    write(tmp_path, {"cpu.max": "50000 100000"})
    assert cgroup_quota(tmp_path, "0::/docker/0123abcd\n") == 0.5
    assert CpuBudget(affinity=2, quota=0.5, online=2).count == 1


def test_usable_cpus_is_the_fewest(tmp_path):
    write(tmp_path, {"cpu.max": "100000 100000"})
    budget = usable_cpus(tmp_path, CONTAINER)
    assert budget.quota == 1.0 and budget.count == 1
    assert budget.online == os.cpu_count() and budget.affinity == len(os.sched_getaffinity(0))
    assert budget.describe().startswith(f"1 CPU (affinity {budget.affinity}, cgroup quota 1, {budget.online} online")
    assert budget.threads == 1


def test_describe_without_quota():
    assert CpuBudget(affinity=2, quota=None, online=4).describe() == "2 CPUs (affinity 2, cgroup quota none, 4 online)"


def test_smt_siblings_count_as_one_core(tmp_path):
    for cpu, siblings in enumerate(["0,2", "1,3", "0,2", "1,3"]):
        write(tmp_path / f"cpu{cpu}" / "topology", {"thread_siblings_list": siblings})
    assert physical_cores(range(4), tmp_path) == 2
    assert physical_cores([0, 2], tmp_path) == 1
    assert physical_cores([0, 7], tmp_path) is None   # cpu7's topology is not there
    budget = CpuBudget(affinity=4, quota=None, online=4, cores=2)
    assert budget.count == 4 and budget.threads == 2
    assert budget.describe() == "4 CPUs (affinity 4, cgroup quota none, 4 online, 2 cores)"
    assert CpuBudget(affinity=4, quota=1.5, online=4, cores=2).threads == 2


def test_thread_count_prefers_what_was_asked():
    assert thread_count(3) == 3
    assert 1 <= thread_count(None) <= (os.cpu_count() or 1)


def test_plan_says_where_the_thread_count_came_from():
    from hayate.plan.report import threads_line

    cpus = CpuBudget(affinity=2, quota=None, online=4)
    assert threads_line(None, cpus) == ("threads: 2, one per usable CPU and at most one per core: "
                                        "2 CPUs (affinity 2, cgroup quota none, 4 online)")
    assert threads_line(3, cpus).startswith("threads: 3, from --threads; usable: 2 CPUs")
