"""`hayate serve --ray`: start (or join) a Ray cluster, run the ingress and the model replicas
as one Serve application at http://HOST:PORT, and take it down on SIGTERM or Ctrl-C."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import threading

from hayate.config import EngineConfig
from hayate.cpus import usable_cpus
from hayate.scale.options import RayOptions, autoscaling_config
from hayate.server import ServerSettings

log = logging.getLogger("hayate.server")
APP_NAME = "hayate"
MODEL_DEPLOYMENT = "model"
INGRESS_DEPLOYMENT = "ingress"
INGRESS_MAX_ONGOING = 4096        # the ingress only relays: it must never be the queue
HEALTH_CHECK_PERIOD_S = 5.0


@dataclasses.dataclass(frozen=True)
class ServeSpec:
    """What the replicas serve and how many requests they hold, from `hayate serve`'s flags."""
    settings: ServerSettings
    config: EngineConfig
    max_queue: int
    host: str
    port: int
    shutdown_timeout: float


def import_ray():
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ValueError("--ray needs Ray Serve: pip install 'hayate[ray]'") from None
    return ray, serve


class _Stopped(Exception):
    """SIGTERM or SIGINT arrived: leave whatever is running (start-up too) and shut down."""


def run_on_ray(spec: ServeSpec, options: RayOptions) -> int:
    """Serve until SIGTERM or Ctrl-C; ValueError (one line) if the replicas cannot start."""
    ray, serve = import_ray()
    local = options.address is None
    ray.init(address="local" if local else options.address, num_cpus=usable_cpus().count if local else None,
             include_dashboard=False, logging_level=logging.WARNING)
    try:
        with _stop_on_signals():
            _deploy(serve, spec, options, int(ray.cluster_resources().get("CPU", 1)))
            threading.Event().wait()
    except _Stopped:
        log.info("stopping the replicas")
    finally:   # a cluster this process joined keeps its other Serve apps
        serve.shutdown() if local else serve.delete(APP_NAME)
        ray.shutdown()
    return 0


def _deploy(serve, spec: ServeSpec, options: RayOptions, cluster_cpus: int) -> None:
    threads = options.replica_threads(cluster_cpus)
    serve.start(http_options={"host": spec.host, "port": spec.port})
    try:
        serve.run(build_app(spec, options, threads, cluster_cpus), name=APP_NAME, route_prefix="/")
    except RuntimeError as error:
        raise ValueError(f"the replicas could not start: {_first_line(error)}") from None
    count = "autoscaled" if options.autoscaled else str(options.replicas)
    log.info("serving on http://%s:%d: %s replicas x %d threads, %s routing", spec.host, spec.port, count,
             threads, options.routing)


def build_app(spec: ServeSpec, options: RayOptions, threads: int, cluster_cpus: int):
    """The Serve application: Ingress bound to the model deployment's handle."""
    from ray import serve

    from hayate.scale.deployments import Ingress, ModelReplica

    config = dataclasses.replace(spec.config, threads=threads)
    model = serve.deployment(ModelReplica, name=MODEL_DEPLOYMENT, **model_options(spec, options, threads,
                                                                                   cluster_cpus))
    ingress = serve.deployment(serve.ingress()(Ingress), name=INGRESS_DEPLOYMENT, num_replicas=1,
                               ray_actor_options={"num_cpus": 0}, max_ongoing_requests=INGRESS_MAX_ONGOING)
    return ingress.bind(model.bind(spec.settings, config, spec.max_queue), spec.settings, options.routing)


def model_options(spec: ServeSpec, options: RayOptions, threads: int, cluster_cpus: int) -> dict:
    """Replica placement, count and routing: `threads` Ray CPUs each (so replicas never share
    cores), a fixed count or autoscaling, and as many requests as hayate batches and queues."""
    scaling = ({"autoscaling_config": autoscaling_config(spec.config.max_num_seqs, cluster_cpus, threads)}
               if options.autoscaled else {"num_replicas": options.replicas})
    routing = {}
    if options.routing == "prefix":
        from ray.serve.config import RequestRouterConfig

        from hayate.scale.router import PrefixRequestRouter

        routing = {"request_router_config": RequestRouterConfig(
            request_router_class=PrefixRequestRouter, request_router_kwargs={"imbalance": spec.config.max_num_seqs})}
    return {**scaling, **routing, "ray_actor_options": {"num_cpus": threads},
            "max_ongoing_requests": spec.config.max_num_seqs + spec.max_queue,
            "health_check_period_s": HEALTH_CHECK_PERIOD_S,
            "graceful_shutdown_timeout_s": spec.shutdown_timeout}


@contextlib.contextmanager
def _stop_on_signals():
    """SIGTERM and SIGINT raise _Stopped in the main thread, even inside serve.run's wait."""
    def stop(signum, frame):
        raise _Stopped()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
