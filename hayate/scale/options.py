"""`hayate serve --ray` options: parsed and checked before Ray starts, so a wrong flag costs a
line, not a cluster start-up."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

ROUTINGS = ("least-loaded", "prefix")
AUTO = "auto"
RAY_ONLY_FLAGS = ("replicas", "routing", "ray_address")


@dataclass(frozen=True)
class RayOptions:
    replicas: int | None          # None: autoscaled (--replicas auto)
    routing: str = "least-loaded"  # least-loaded: Ray's power of two choices; prefix: by prompt prefix
    address: str | None = None    # an existing Ray cluster ("auto", "ray://host:10001", ...); None: start one here
    threads: int | None = None    # per replica; None: the CPUs divided among the replicas

    def __post_init__(self) -> None:
        if self.replicas is not None and self.replicas < 1:
            raise ValueError(f"--replicas must be >= 1 or auto, got {self.replicas}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"--routing must be one of {', '.join(ROUTINGS)}, got {self.routing!r}")

    @property
    def autoscaled(self) -> bool:
        return self.replicas is None

    def replica_threads(self, cluster_cpus: int) -> int:
        """Threads (and Ray CPUs) per replica: --threads, else a fixed count's share of the
        cluster's CPUs; an autoscaled deployment starts from one CPU per replica."""
        if self.threads is not None:
            return self.threads
        return 1 if self.autoscaled else max(1, cluster_cpus // self.replicas)


def add_ray_options(parser: argparse.ArgumentParser) -> None:
    """`hayate serve`'s --ray flags; all but --ray default to None, so a flag given without --ray is seen."""
    group = parser.add_argument_group("replicas on Ray Serve (pip install 'hayate[ray]')")
    group.add_argument("--ray", action="store_true",
                       help="serve replicas of the model on Ray Serve, behind one ingress at HOST:PORT")
    group.add_argument("--replicas", help="model replicas: a count (default 1), or auto: autoscaled on ongoing "
                                          "requests from 1 up to the cluster's CPUs / --threads")
    group.add_argument("--routing", choices=ROUTINGS,
                       help="least-loaded: Ray's power of two choices (default); prefix: prompts that start "
                            "alike go to the replica that has their prefix cached")
    group.add_argument("--ray-address", help="join this Ray cluster (auto, or HOST:6379) instead of starting "
                                             "one here; hayate must be installed on every node")


def parse_replicas(text: str) -> int | None:
    """`--replicas`: a count >= 1, or `auto` (None)."""
    if text.strip().lower() == AUTO:
        return None
    try:
        count = int(text)
    except ValueError:
        raise ValueError(f"--replicas must be a number or auto, got {text!r}") from None
    if count < 1:
        raise ValueError(f"--replicas must be >= 1 or auto, got {count}")
    return count


def ray_options(args: argparse.Namespace) -> RayOptions | None:
    """The --ray options of `hayate serve`, or None without --ray; ValueError for flags that
    need --ray without it, or that Ray replicas cannot honour."""
    if not args.ray:
        given = [flag for flag in RAY_ONLY_FLAGS if getattr(args, flag, None) is not None]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} needs --ray")
        return None
    if (getattr(args, "tensor_parallel", None) or 1) > 1:
        raise ValueError("--ray and --tensor-parallel cannot be combined yet: each Ray replica is one process")
    if args.device != "cpu":
        raise ValueError(f"--ray runs replicas on the CPU; --device {args.device} is not supported with --ray yet")
    return RayOptions(replicas=parse_replicas(args.replicas or "1"), routing=args.routing or "least-loaded",
                      address=args.ray_address, threads=args.threads)


def autoscaling_config(max_batch: int, cluster_cpus: int, threads: int) -> dict:
    """Ray Serve autoscaling on ongoing (running + queued) requests per replica: a replica is
    added once half a batch waits on average, since a new one takes a model load to come up;
    from 1 replica up to as many as the cluster's CPUs hold at `threads` each."""
    return {"min_replicas": 1, "initial_replicas": 1, "max_replicas": max(1, cluster_cpus // threads),
            "target_ongoing_requests": max(1, max_batch // 2),
            "upscale_delay_s": 10.0, "downscale_delay_s": 300.0}
