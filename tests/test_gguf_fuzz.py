"""Seeded fuzzing of GGUF loading: a few hundred mutants of a tiny valid file (bit flips, byte
and integer overwrites, truncations, swapped value types, bad counts and tensor entries) each
load as the CLI loads them and then answer one token, or fail with one ValueError line
(GGUFError / ModelLoadError / ChatTemplateError while loading): never another exception, a hang
or a huge allocation.

The mutants run in a child process (this file run as a script) under an address-space limit,
each with a time budget. HAYATE_FUZZ_SEED=N explores other seeds, HAYATE_FUZZ_COUNT=N other counts;
a failure names the seed and mutant, and `python tests/test_gguf_fuzz.py --replay SEED INDEX`
writes that mutant out for a closer look."""
from __future__ import annotations

import json
import os
import random
import resource
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

SEED = int(os.environ.get("HAYATE_FUZZ_SEED", "20240601"))
COUNT = int(os.environ.get("HAYATE_FUZZ_COUNT", "400"))
TIME_BUDGET_S = 2.0           # per mutant
ADDRESS_SPACE_MARGIN = 1 << 30  # bytes a mutant may map beyond the warmed-up worker's
MAX_RSS_GROWTH_KB = 500_000
INTERESTING_INTS = [0, 1, 2, 3, 7, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1,
                    2 ** 40, 2 ** 63 - 1, 2 ** 64 - 1, 2 ** 64 - 2, 1_000_000]


# ---- mutations -------------------------------------------------------------------------------

class Layout:
    """Where a file's fields, tensor entries and tensor data start."""

    def __init__(self, path: Path):
        import gguf
        reader = gguf.GGUFReader(path)
        self.data_offset = reader.data_offset
        # (offset of the field's value type, offset of its value)
        self.fields = [(f.offset + 8 + int(f.parts[0][0]), f.offset + 12 + int(f.parts[0][0]))
                       for name, f in reader.fields.items() if not name.startswith("GGUF.")]
        self.tensor_parts = [[t.field.offset + sum(int(p.nbytes) for p in t.field.parts[:i]) for i in (2, 3, 4, 5)]
                             for t in reader.tensors]


def mutate(content: bytes, layout: Layout, rng: random.Random) -> tuple[bytes, str]:
    """One mutant of `content` and what was done to it."""
    data = bytearray(content)
    header = rng.random() < 0.85   # most mutations hit the metadata and tensor table
    offset = rng.randrange(24 if header else 0, layout.data_offset if header else len(data))
    kind = rng.choice(["bit", "byte", "int32", "int64", "truncate", "value type", "value", "tensor", "splice"])
    if kind == "bit":
        data[offset] ^= 1 << rng.randrange(8)
    elif kind == "byte":
        data[offset] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
    elif kind in ("int32", "int64"):
        size = 4 if kind == "int32" else 8
        value = rng.choice(INTERESTING_INTS) % (1 << (8 * size))
        data[offset:offset + size] = value.to_bytes(size, "little")
    elif kind == "truncate":
        del data[offset:]
    elif kind == "value type":
        offset, _ = rng.choice(layout.fields)
        data[offset:offset + 4] = struct.pack("<I", rng.choice([*range(13), 99, 2 ** 32 - 1]))
    elif kind == "value":   # a field's first value bytes: a number, a length or an array's type and count
        _, offset = rng.choice(layout.fields)
        size = rng.choice([1, 4, 8, 12])
        data[offset:offset + size] = bytes(rng.choice([0x00, 0xFF, 0x7F, 0x80, 0x01])
                                           for _ in range(size))
    elif kind == "tensor":
        part = rng.randrange(4)
        offset = rng.choice(layout.tensor_parts)[part]
        size = 8 if part in (1, 3) else 4
        data[offset:offset + size] = (rng.choice(INTERESTING_INTS) % (1 << (8 * size))).to_bytes(size, "little")
    else:   # splice: drop or repeat a few header bytes
        length = rng.randrange(1, 16)
        if rng.random() < 0.5:
            data[offset:offset] = data[offset:offset + length]
        else:
            del data[offset:offset + length]
    return bytes(data), f"{kind} at byte {offset}"


# ---- the child process -----------------------------------------------------------------------

class Hang(BaseException):
    """A mutant ran past its time budget (BaseException: no `except Exception` swallows it)."""


def _on_alarm(signum, frame):
    raise Hang()


def try_mutant(path: Path, budget_s: float = TIME_BUDGET_S) -> tuple[str, str]:
    """(outcome, detail): "loaded", "refused" (GGUFError / ModelLoadError / ChatTemplateError), "rejected"
    (another one-line ValueError after loading, as a request's error), or "FAIL". LLM() collects
    and freezes the garbage collector's objects, so each load only scans its own."""
    from hayate.config import EngineConfig
    from hayate.llm import LLM
    from hayate.loading.chat_template import ChatTemplateError
    from hayate.loading.gguf import GGUFError
    from hayate.loading.loader import ModelLoadError
    from hayate.sampling import SamplingParams

    stage = "load"
    signal.setitimer(signal.ITIMER_REAL, budget_s)
    try:
        llm = LLM(config=EngineConfig(model=str(path), threads=1))
        stage = "run"
        result = llm.chat([{"role": "user", "content": "hi a"}], SamplingParams(max_tokens=1))
        return "loaded", repr(result.text)
    except (GGUFError, ModelLoadError, ChatTemplateError) as error:   # the template is compiled at load
        return ("refused", str(error)) if "\n" not in str(error) else ("FAIL", f"two lines: {error!r}")
    except ValueError as error:
        if stage == "run" and "\n" not in str(error) and str(error):
            return "rejected", f"{type(error).__name__}: {error}"
        return "FAIL", f"{stage}: {type(error).__name__}: {error}"
    except Hang:
        return "FAIL", f"{stage}: ran past {budget_s} s"
    except BaseException as error:   # noqa: BLE001 - anything else is what this test hunts
        return "FAIL", f"{stage}: {type(error).__name__}: {error}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _limit_address_space() -> None:
    with open("/proc/self/status") as status:
        vm_size_kb = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    limit = vm_size_kb * 1024 + ADDRESS_SPACE_MARGIN
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def run_worker(base: Path, seed: int, count: int) -> dict:
    import torch
    torch.set_num_threads(1)
    signal.signal(signal.SIGALRM, _on_alarm)
    content, layout = base.read_bytes(), Layout(base)
    warm = try_mutant(base, budget_s=600)   # the valid file: builds the thread pools (and kernels) once
    assert warm[0] == "loaded", warm
    _limit_address_space()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rng, outcomes, failures = random.Random(seed), {}, []
    mutant_path = base.with_name("mutant.gguf")
    for index in range(count):
        mutant, description = mutate(content, layout, rng)
        mutant_path.write_bytes(mutant)
        outcome, detail = try_mutant(mutant_path)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if outcome == "FAIL":
            failures.append(f"seed {seed} mutant {index} ({description}): {detail}")
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    return {"outcomes": outcomes, "failures": failures, "rss_growth_kb": growth}


def replay(seed: int, index: int, base: Path, out: Path) -> str:
    """Write mutant `index` of seed `seed` to `out`; return what was done to it."""
    content, layout, rng = base.read_bytes(), Layout(base), random.Random(seed)
    for _ in range(index + 1):
        mutant, description = mutate(content, layout, rng)
    out.write_bytes(mutant)
    return description


# ---- the test --------------------------------------------------------------------------------

def test_mutants_load_or_fail_with_one_line(tmp_path):
    from test_gguf_hostile import write_gguf

    base = write_gguf(tmp_path / "base.gguf")
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run([sys.executable, __file__, "--worker", str(base), str(SEED), str(COUNT)],
                           capture_output=True, text=True, timeout=600 + COUNT * TIME_BUDGET_S / 4, env=env)
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"\nseed {SEED}: {report['outcomes']} in {time.perf_counter() - start:.1f} s, "
          f"max RSS grew {report['rss_growth_kb'] / 1024:.0f} MB")
    assert not report["failures"], "\n".join(report["failures"][:20])
    assert report["rss_growth_kb"] < MAX_RSS_GROWTH_KB
    assert report["outcomes"].get("refused", 0) > COUNT // 3 and report["outcomes"].get("loaded", 0) > 0


if __name__ == "__main__":
    if sys.argv[1] == "--worker":
        print(json.dumps(run_worker(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))))
    elif sys.argv[1] == "--replay":   # --replay SEED INDEX: writes mutant.gguf here
        sys.path.insert(0, str(Path(__file__).parent))
        from test_gguf_hostile import write_gguf
        base = write_gguf(Path("fuzz-base.gguf"))
        print(replay(int(sys.argv[2]), int(sys.argv[3]), base, Path("mutant.gguf")))
    else:
        pytest.main([__file__, "-s"])
