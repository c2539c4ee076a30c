"""The bench's results: a table with hayate/peer ratios, the plan floor lines, and JSON."""
from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
from rich.table import Table

from hayate.bench.background import DESCRIPTIONS
from hayate.bench.offline import HAYATE, BenchPlan, PlanFloor
from hayate.bench.timings import EngineResult
from hayate.cpus import usable_cpus


@dataclass
class BenchReport:
    model: str
    threads: int
    weights: str
    plan: BenchPlan
    engines: list[EngineResult]          # hayate first
    floor: PlanFloor | None = None
    load_average_before: float | None = None   # 1-minute load average when the bench started
    kv_cache_dtype: str = "auto"
    background: str = "none"             # the load beside every measurement (background.py)
    speculative: str | None = None       # hayate's speculative decoding (--speculative), if any

    def engine(self, name: str) -> EngineResult | None:
        return next((engine for engine in self.engines if engine.name == name), None)


def metric_rows(report: BenchReport) -> list[tuple[str, str, Callable[[EngineResult], float | None]]]:
    """(key, label, getter) for every reported figure; ratios are hayate / peer."""
    rows = [("decode_tokens_per_s", "decode tok/s", lambda e: e.decode_tokens_per_s)]
    rows += [(f"ttft_ms_{length}", f"TTFT {length} tok (ms)", lambda e, n=length: e.ttft_ms.get(n))
             for length in report.plan.prompt_lengths]
    rows += [(f"itl_{q}_ms", f"ITL {q} (ms)", lambda e, k=q: e.itl_ms.get(k)) for q in ("p50", "p90", "p99")]
    rows.append(("itl_p99_over_p50", "ITL p99/p50", lambda e: e.itl_p99_over_p50))
    return rows


def ratio(hayate_value: float | None, peer_value: float | None) -> float | None:
    if hayate_value is None or not peer_value:
        return None
    return hayate_value / peer_value


def _cell(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"


def results_table(report: BenchReport) -> Table:
    hayate = report.engine(HAYATE)
    peers = [engine for engine in report.engines if engine.name != HAYATE and engine.ok]
    kv = "" if report.kv_cache_dtype == "auto" else f", KV cache {report.kv_cache_dtype}"
    background = "" if report.background == "none" else f", background {report.background}"
    kv += "" if report.speculative is None else f", hayate speculative {report.speculative}"
    table = Table(title=f"{Path(report.model).name}, {report.threads} threads, weights {report.weights}{kv}, "
                        f"median of {report.plan.repeats} rounds, engines taking turns{background}")
    table.add_column("metric")
    for engine in report.engines:
        table.add_column(engine.name, justify="right")
    for peer in peers:
        table.add_column(f"hayate/{peer.name}", justify="right")
    for _, label, getter in metric_rows(report):
        values = [_cell(getter(engine)) if engine.ok else "-" for engine in report.engines]
        ratios = [_cell(ratio(getter(hayate), getter(peer))) for peer in peers]
        table.add_row(label, *values, *ratios)
    table.add_row("decoded tokens", *[str(e.decode_tokens) if e.ok else "-" for e in report.engines],
                  *["" for _ in peers])
    return table


def paired_ratios(report: BenchReport) -> dict[str, dict[str, list[float]]]:
    """hayate/peer within each round (the two ran back to back): decode tok/s and TTFT per length."""
    hayate = report.engine(HAYATE)
    if hayate is None or not hayate.ok:
        return {}
    paired = {}
    for peer in report.engines:
        if peer.name == HAYATE or not peer.ok:
            continue
        figures = {"decode_tokens_per_s": (hayate.decode_rounds_tokens_per_s, peer.decode_rounds_tokens_per_s)}
        figures.update({f"ttft_ms_{n}": (hayate.ttft_rounds_ms[n], peer.ttft_rounds_ms[n])
                        for n in hayate.ttft_rounds_ms if n in peer.ttft_rounds_ms})
        paired[peer.name] = {key: [ours / theirs for ours, theirs in zip(*pair) if theirs]
                             for key, pair in figures.items()}
    return paired


def paired_lines(report: BenchReport) -> list[str]:
    """Each peer's per-round ratios: their spread shows how far one run's noise moves a ratio."""
    lines = []
    for peer, figures in paired_ratios(report).items():
        parts = [f"{'decode tok/s' if key.startswith('decode') else 'TTFT ' + key.split('_')[-1]} "
                 + " ".join(f"{value:.2f}" for value in values) for key, values in figures.items() if values]
        lines.append(f"hayate/{peer} round by round: " + "; ".join(parts))
    return lines


def notes(report: BenchReport) -> list[str]:
    """Failed and skipped engines, the rounds' ratios, then how hayate stands against the plan's floor."""
    lines = [f"{engine.name}: {engine.status}: {engine.error}" for engine in report.engines if not engine.ok]
    lines.append("ratios are hayate/peer: above 1 is better for tok/s, below 1 for times")
    lines += paired_lines(report)
    hayate, floor = report.engine(HAYATE), report.floor
    if floor is None or hayate is None or not hayate.ok:
        return lines
    lines.append(f"plan floor on {floor.hardware}: {floor.bandwidth_gb_s:.1f} GB/s read, "
                 f"{floor.matmul_gflops:.0f} GFLOP/s, decode context {floor.context}")
    if hayate.decode_tokens_per_s:
        lines.append(f"plan floor {floor.decode_tokens_per_s:.1f} tok/s, measured "
                     f"{hayate.decode_tokens_per_s:.1f} ({percent_of_floor_decode(report):.0f}% of the floor)")
    if hayate.decode_tokens_per_s and floor.predicted_decode_tokens_per_s:
        lines.append(f"plan predicted {floor.predicted_decode_tokens_per_s:.1f} tok/s (kernels' measured rates "
                     f"+ fixed per-step cost), measured/predicted "
                     f"{hayate.decode_tokens_per_s / floor.predicted_decode_tokens_per_s:.2f}")
    for length, percent in percent_of_floor_ttft(report).items():
        lines.append(f"plan floor TTFT {length} tok {floor.ttft_ms[length]:.1f} ms, measured "
                     f"{hayate.ttft_ms[length]:.1f} ms ({percent:.0f}% of the floor)")
    if floor.machine_jitter and hayate.itl_p99_over_p50:
        lines.append(f"this machine's own jitter: reading one step's bytes again and again, p99/p50 "
                     f"{floor.machine_jitter:.2f} (under any engine's ITL p99/p50; hayate's {hayate.itl_p99_over_p50:.2f})")
    return lines


def percent_of_floor_decode(report: BenchReport) -> float | None:
    hayate = report.engine(HAYATE)
    if report.floor is None or hayate is None or not hayate.decode_tokens_per_s:
        return None
    return 100 * hayate.decode_tokens_per_s / report.floor.decode_tokens_per_s


def percent_of_floor_ttft(report: BenchReport) -> dict[int, float]:
    """Achieved speed as a share of the floor: floor time / measured time."""
    hayate = report.engine(HAYATE)
    if report.floor is None or hayate is None:
        return {}
    return {length: 100 * report.floor.ttft_ms[length] / measured
            for length, measured in hayate.ttft_ms.items() if measured and length in report.floor.ttft_ms}


def engine_json(engine: EngineResult) -> dict:
    return {"status": engine.status, "error": engine.error, "load_s": engine.load_s,
            "ttft_ms": {str(length): ms for length, ms in engine.ttft_ms.items()},
            "decode_tokens_per_s": engine.decode_tokens_per_s, "itl_ms": engine.itl_ms,
            "itl_p99_over_p50": engine.itl_p99_over_p50, "decode_tokens": engine.decode_tokens,
            "decode_prompt_length": engine.decode_prompt_length, "itl_samples_ms": engine.itl_samples_ms,
            "decode_rounds_tokens_per_s": engine.decode_rounds_tokens_per_s,
            "ttft_rounds_ms": {str(length): values for length, values in engine.ttft_rounds_ms.items()}}


def ratios_json(report: BenchReport) -> dict:
    hayate = report.engine(HAYATE)
    if hayate is None or not hayate.ok:
        return {}
    return {peer.name: {key: ratio(getter(hayate), getter(peer)) for key, _, getter in metric_rows(report)}
            for peer in report.engines if peer.name != HAYATE and peer.ok}


def floor_json(report: BenchReport) -> dict | None:
    if report.floor is None:
        return None
    floor = asdict(report.floor)
    floor["ttft_ms"] = {str(length): ms for length, ms in report.floor.ttft_ms.items()}
    floor["decode_percent_of_floor"] = percent_of_floor_decode(report)
    floor["ttft_percent_of_floor"] = {str(n): p for n, p in percent_of_floor_ttft(report).items()}
    return floor


def to_json(report: BenchReport) -> dict:
    return {
        "model": report.model, "threads": report.threads, "weights": report.weights,
        "kv_cache_dtype": report.kv_cache_dtype, "background": report.background, "speculative": report.speculative,
        "background_load": DESCRIPTIONS[report.background],
        "prompt_lengths": report.plan.prompt_lengths, "decode_tokens": report.plan.decode_tokens,
        "decode_prompt_length": report.plan.decode_prompt_length, "repeats": report.plan.repeats,
        "statistic": "median", "schedule": "rounds: every engine in turn, order rotating",
        "engines": {engine.name: engine_json(engine) for engine in report.engines},
        "ratios": ratios_json(report),
        "ratios_by_round": paired_ratios(report),
        "plan": floor_json(report),
        "environment": {"omp_proc_bind": os.environ.get("OMP_PROC_BIND"), "torch": torch.__version__,
                        "load_average_1m_before": report.load_average_before,
                        "machine": platform.machine(), "cpu_count": os.cpu_count(),
                        "usable_cpus": usable_cpus().describe(),
                        "created": datetime.now(timezone.utc).isoformat(timespec="seconds")},
    }


def write_json(report: BenchReport, path: Path) -> None:
    Path(path).write_text(json.dumps(to_json(report), indent=2) + "\n")
