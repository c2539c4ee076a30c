"""Tensor parallel over torch.distributed (gloo), nano-vllm's shape: rank 0 is the engine
process (scheduler, block manager, API); ranks 1..N-1 are worker processes that load the same
model, keep their slices of it (layers/tensor_parallel.py) and their slice of the KV cache, and
run every forward pass rank 0 runs, adding partial outputs with it twice a layer.

Rank 0 sends each step to the workers through their stdin as int64 arrays (token ids,
positions' starts and lengths, block tables: nothing is pickled); the ranks' partial sums go
through gloo. A worker that exits, or a step that fails on any rank, raises WorkerLostError on
rank 0: the engine stops and says why (the server turns unhealthy), instead of hanging. A
worker ends when its stdin closes, so none outlives rank 0, even one killed outright.

Run as a worker: python -m hayate.engine.tensor_parallel RANK WORLD STORE NUM_BLOCKS CONFIG_JSON"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from hayate.config import EngineConfig
from hayate.cpus import thread_count
from hayate.layers.attention import AttentionMetadata
from hayate.layers.tensor_parallel import PartialSums, Shard, shard_model

log = logging.getLogger("hayate.engine")
READY = "hayate-worker-ready"
# a partial sum waits at most this long for the other ranks (a worker stalled, not dead)
STEP_TIMEOUT = datetime.timedelta(seconds=120)
# rank 0 waits this long for the workers to join once they have loaded
JOIN_TIMEOUT = datetime.timedelta(seconds=120)


class WorkerLostError(RuntimeError):
    """A tensor-parallel worker exited or a step failed across the ranks: the engine cannot go on."""


def threads_per_rank(config: EngineConfig) -> int:
    """Each rank's share of the CPU threads hayate may use."""
    return max(1, thread_count(config.threads) // config.tensor_parallel)


def group(store_path: str, rank: int, world: int) -> dist.ProcessGroupGloo:
    """The ranks' gloo group, met through a file store (no port to pick or leak); an object, not
    torch.distributed's global default group, so an engine can start and stop within a process."""
    store = dist.FileStore(store_path, world)
    store.set_timeout(JOIN_TIMEOUT)
    return dist.ProcessGroupGloo(store, rank, world, STEP_TIMEOUT)


def step_message(tables: list[list[int]], starts: list[int], counts: list[int], token_ids: list[int]) -> bytes:
    """A step as int64s: a header (sequences, tokens, table width), then starts, counts, block
    tables padded with -1, and the token ids."""
    width = max(len(table) for table in tables)
    padded = [table + [-1] * (width - len(table)) for table in tables]
    flat = [len(tables), len(token_ids), width, *starts, *counts, *(b for row in padded for b in row), *token_ids]
    return np.asarray(flat, dtype=np.int64).tobytes()


def read_step(stream) -> tuple[list[list[int]], list[int], list[int], list[int]] | None:
    """The next step from `stream` (step_message's layout); None at its end."""
    header = _read_exactly(stream, 3 * 8)
    if header is None:
        return None
    sequences, tokens, width = np.frombuffer(header, dtype=np.int64).tolist()
    body = _read_exactly(stream, (2 * sequences + sequences * width + tokens) * 8)
    if body is None:
        return None
    values = np.frombuffer(body, dtype=np.int64)
    starts, counts = values[:sequences].tolist(), values[sequences:2 * sequences].tolist()
    rows = values[2 * sequences:2 * sequences + sequences * width].reshape(sequences, width).tolist()
    tables = [[b for b in row if b >= 0] for row in rows]
    return tables, starts, counts, values[2 * sequences + sequences * width:].tolist()


def _read_exactly(stream, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


class TensorParallel:
    """Rank 0's side: the worker processes, the group, and step fan-out."""

    def __init__(self, config: EngineConfig, workers: list[subprocess.Popen], folder: tempfile.TemporaryDirectory):
        self.world = config.tensor_parallel
        self.workers, self._folder = workers, folder
        self.group = None
        self._closer = weakref.finalize(self, _stop, workers, folder)

    @classmethod
    def start(cls, config: EngineConfig, num_blocks: int) -> "TensorParallel":
        """Start ranks 1..N-1, each loading the model itself, and wait until they have."""
        folder = tempfile.TemporaryDirectory(prefix="hayate-tp-")
        store = str(Path(folder.name) / "store")
        settings = json.dumps(dataclasses.asdict(config))
        workers = [subprocess.Popen([sys.executable, "-m", "hayate.engine.tensor_parallel", str(rank),
                                     str(config.tensor_parallel), store, str(num_blocks), settings],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                   for rank in range(1, config.tensor_parallel)]
        parallel = cls(config, workers, folder)
        for rank, worker in enumerate(workers, 1):
            line = worker.stdout.readline().decode(errors="replace").strip()
            if line != READY:
                parallel.close()
                raise WorkerLostError(f"tensor-parallel worker {rank} could not load the model "
                                      f"(exit code {worker.wait()}; its error is in the log above)")
        parallel.group = group(store, 0, parallel.world)
        return parallel

    def shard(self, model: torch.nn.Module, expert_parallel: bool) -> tuple[int, int]:
        """Cut rank 0's model to its slices; its (query heads, key-value heads)."""
        return shard_model(model, Shard(0, self.world), PartialSums(self.group, 0, self.world), expert_parallel)

    def send(self, tables: list[list[int]], starts: list[int], counts: list[int], token_ids: list[int]) -> None:
        """Hand the step rank 0 is about to run to every worker."""
        message = step_message(tables, starts, counts, token_ids)
        for worker in self.workers:
            try:
                worker.stdin.write(message)
                worker.stdin.flush()
            except (BrokenPipeError, OSError) as error:
                raise self.lost() from error

    def check(self) -> None:
        """Raise WorkerLostError if a worker has exited."""
        for rank, worker in enumerate(self.workers, 1):
            if worker.poll() is not None:
                raise WorkerLostError(f"tensor-parallel worker {rank} exited (code {worker.returncode})")

    def lost(self) -> WorkerLostError:
        """The error for a step that failed across the ranks: which worker exited, if one did."""
        try:
            self.check()
        except WorkerLostError as error:
            return error
        return WorkerLostError("a tensor-parallel step failed across the ranks")

    def close(self) -> None:
        self._closer()


def _stop(workers: list[subprocess.Popen], folder: tempfile.TemporaryDirectory) -> None:
    """Close the workers' stdin (they exit), then wait for them, killing any that lingers."""
    for worker in workers:
        try:
            worker.stdin.close()
        except OSError:
            pass
    for worker in workers:
        try:
            worker.wait(timeout=10)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    folder.cleanup()


def forward(model: torch.nn.Module, tables: list[list[int]], starts: list[int], counts: list[int],
            token_ids: list[int], block_size: int, device: torch.device) -> torch.Tensor:
    """One eager forward pass over a step: the hidden states of its tokens."""
    meta = AttentionMetadata.build(tables, starts, counts, block_size, device)
    return model(torch.tensor(token_ids, device=device), meta.positions(), meta)


def run_worker(rank: int, world: int, store: str, num_blocks: int, config: EngineConfig) -> int:
    """A worker's life: load, report ready, join the group, shard, then run steps until stdin ends."""
    from hayate.engine.kv_cache import KVCache, kv_cache_dtype
    from hayate.loading.loader import load_model

    torch.set_num_threads(threads_per_rank(config))
    loaded = load_model(config)
    print(READY, flush=True)
    sums = PartialSums(group(store, rank, world), rank, world)
    heads, kv_heads = shard_model(loaded.model, Shard(rank, world), sums, config.expert_parallel)
    weight = next(loaded.model.parameters())
    cache = KVCache(dataclasses.replace(loaded.config, num_attention_heads=heads, num_key_value_heads=kv_heads),
                    num_blocks, config.block_size, kv_cache_dtype(config.kv_cache_dtype, weight.dtype), weight.device)
    cache.bind(loaded.model)
    with torch.inference_mode():
        while (step := read_step(sys.stdin.buffer)) is not None:
            forward(loaded.model, *step, config.block_size, weight.device)
    return 0


def main(argv: list[str]) -> int:
    rank, world, store, num_blocks, settings = argv
    logging.basicConfig(level=logging.WARNING, format=f"worker {rank}: %(levelname)s: %(message)s")
    return run_worker(int(rank), int(world), store, int(num_blocks), EngineConfig(**json.loads(settings)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
