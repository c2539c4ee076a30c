"""`--routing prefix`: a Ray Serve request router (the public `ray.serve.request_router` API)
that sends each request to the replica its prompt prefix hashes to (prefix.py), so that
replica's prefix cache serves the shared part; load wins over affinity when that replica is a
full batch busier than the least loaded one."""
from __future__ import annotations

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from hayate.scale.prefix import rank_replicas


PREFERRED_PROBES = 3


class PrefixRequestRouter(RequestRouter):
    """Ranks the replica a request's prefix key prefers first, then the others (among which,
    as in every rank, Ray takes the shortest queue that accepts). No FIFOMixin: the replica
    chosen for a request serves that request, not whichever one waited longest."""

    def initialize_state(self, imbalance: int = 16, **kwargs) -> None:
        self.imbalance = imbalance   # queue-length lead past which affinity gives way to load

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        key = _prefix_key(pending_request)
        if key is None or len(candidate_replicas) < 2:
            return [candidate_replicas]
        by_id = {replica.replica_id.unique_id: replica for replica in candidate_replicas}
        preferred, *others = (by_id[unique_id] for unique_id in rank_replicas(key, by_id))
        if self._too_busy(preferred, candidate_replicas):
            return [candidate_replicas]
        # Ray drops a replica from a rank when its queue-length probe misses a deadline (0.1 s,
        # doubling on each miss): a busy engine's event loop can miss one, so ask it thrice.
        return [[preferred]] * PREFERRED_PROBES + [others]

    def _too_busy(self, preferred: RunningReplica, candidates: list[RunningReplica]) -> bool:
        """Whether `preferred`'s last known queue is `imbalance` longer than the shortest one."""
        queue = self.replica_queue_len_cache.get
        lengths = {replica.replica_id: queue(replica.replica_id) for replica in candidates}
        known = [length for length in lengths.values() if length is not None]
        mine = lengths[preferred.replica_id]
        return mine is not None and bool(known) and mine - min(known) >= self.imbalance


def _prefix_key(pending_request: PendingRequest | None) -> str | None:
    """The key the ingress put on the forwarded request (relay.ForwardedRequest.prefix_key)."""
    if pending_request is None or not pending_request.args:
        return None
    return getattr(pending_request.args[0], "prefix_key", None)
