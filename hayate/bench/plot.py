"""The benchmarks' PNGs, drawn with matplotlib (the optional `bench` extra). hayate bench's:
decode tokens/s per engine with each round's figure, time to first token per prompt length,
and each engine's inter-token latency distribution (cumulative). bench/serve_compare.py's:
output tokens/s, time to first token and inter-token latency against concurrent users."""
from __future__ import annotations

from pathlib import Path

from hayate.bench.timings import EngineResult

COLORS = {"hayate": "#d62728", "llama.cpp": "#1f77b4", "transformers": "#2ca02c"}
OTHER_COLOR = "#7f7f7f"


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")   # files only: no display needed
    import matplotlib.pyplot as plt
    return plt


def draw_png(engines: list[EngineResult], path: Path, title: str) -> None:
    """Engines without figures (failed, skipped) are left out."""
    plt = _pyplot()
    shown = [engine for engine in engines if engine.ok]
    figure, (decode, ttft, itl) = plt.subplots(1, 3, figsize=(15, 4.6), layout="constrained")
    figure.suptitle(title)
    _decode(decode, shown)
    _ttft(ttft, shown)
    _itl(itl, shown)
    figure.savefig(path, format="png", dpi=100)
    plt.close(figure)


def _color(name: str) -> str:
    return COLORS.get(name, OTHER_COLOR)


def _decode(axes, engines: list[EngineResult]) -> None:
    """Median decode tokens/s a bar, each round's figure a dot on it."""
    names = [engine.name for engine in engines]
    rates = [engine.decode_tokens_per_s or 0.0 for engine in engines]
    bars = axes.bar(names, rates, color=[_color(name) for name in names])
    axes.bar_label(bars, fmt="%.1f")
    for index, engine in enumerate(engines):
        rounds = engine.decode_rounds_tokens_per_s
        axes.plot([index] * len(rounds), rounds, "o", color="black", markersize=3)
    axes.set(title="decode (tokens/s, higher is better)", ylabel="tokens/s")


def _ttft(axes, engines: list[EngineResult]) -> None:
    """Time to first token per prompt length, one bar per engine in each group."""
    lengths = sorted({length for engine in engines for length in engine.ttft_ms})
    width = 0.8 / max(len(engines), 1)
    for index, engine in enumerate(engines):
        xs = [position + index * width for position, length in enumerate(lengths) if length in engine.ttft_ms]
        values = [engine.ttft_ms[length] for length in lengths if length in engine.ttft_ms]
        axes.bar(xs, values, width, label=engine.name, color=_color(engine.name))
    axes.set_xticks([position + width * (len(engines) - 1) / 2 for position in range(len(lengths))],
                    [f"{length} tokens" for length in lengths])
    axes.set(title="time to first token (ms, lower is better)", ylabel="ms", yscale="log" if lengths else "linear")
    axes.legend()


def _itl(axes, engines: list[EngineResult]) -> None:
    """Each engine's inter-token gaps, sorted: the share of gaps at most x ms."""
    for engine in engines:
        samples = sorted(engine.itl_samples_ms)
        if samples:
            shares = [(rank + 1) / len(samples) for rank in range(len(samples))]
            axes.step(samples, shares, where="post", label=engine.name, color=_color(engine.name))
    axes.set(title="inter-token latency (cumulative)", xlabel="ms between tokens", ylabel="share of gaps",
             xscale="log", ylim=(0, 1.02))
    axes.xaxis.set_minor_formatter("")   # labels on the decades only: minor ones overlap
    axes.grid(True, alpha=0.3)
    axes.legend()


def draw_serving_png(reports: dict[str, dict], path: Path, title: str) -> None:
    """`reports`: each server's bench/load.py report (its "levels", one per concurrency)."""
    plt = _pyplot()
    figure, (rate, ttft, itl) = plt.subplots(1, 3, figsize=(15, 4.6), layout="constrained")
    figure.suptitle(title)
    for name, report in reports.items():
        levels = sorted(report["levels"], key=lambda level: level["concurrency"])
        users = [level["concurrency"] for level in levels]
        style = {"color": _color(name), "marker": "o"}
        rate.plot(users, [level["output_tokens_per_s"] for level in levels], label=name, **style)
        ttft.plot(users, [level["ttft_ms"]["p50"] for level in levels], label=name, **style)
        itl.plot(users, [level["itl_ms"]["p50"] for level in levels], label=f"{name} p50", **style)
        itl.plot(users, [level["itl_ms"]["p99"] for level in levels], label=f"{name} p99", linestyle="--", **style)
    rate.set(title="output tokens/s, all users (higher is better)", ylabel="tokens/s")
    ttft.set(title="time to first token p50 (ms)", ylabel="ms", yscale="log")
    itl.set(title="inter-token latency (ms)", ylabel="ms", yscale="log")
    counts = sorted({level["concurrency"] for report in reports.values() for level in report["levels"]})
    for axes in (rate, ttft, itl):
        axes.set(xlabel="concurrent users", xscale="log")
        axes.set_xticks(counts, [str(count) for count in counts], minor=False)
        axes.xaxis.set_minor_formatter("")
        axes.grid(True, alpha=0.3)
        axes.legend()
    figure.savefig(path, format="png", dpi=100)
    plt.close(figure)
