"""hayate plan: the cost of one step of the model, and the fastest this machine could run it."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table

from hayate.config import WEIGHT_MODES, EngineConfig
from hayate.cpus import CpuBudget, thread_count, usable_cpus
from hayate.loading.loader import load_model
from hayate.engine.decode_plan import decode_path
from hayate.engine.kv_cache import KVCache, kv_cache_dtype
from hayate.plan.cost import StepCost, decode_cost, group_rows, memory_by_format, packed_types, prefill_cost
from hayate.plan.dispatch import dispatch_seconds
from hayate.plan.hardware import HardwareProfile, datasheet_profiles, probe_cpu

PROMPT_LENGTHS = (32, 512, 2048)


@dataclass
class Prediction:
    decode_tokens_per_second: float         # the floor: bytes and FLOPs at the probe's rates
    decode_step_seconds: float
    time_to_first_token: dict[int, float]   # prompt length -> seconds (floor)
    kernel_step_seconds: float              # the step's bytes at the native kernels' measured rates

    def expected_step_seconds(self, fixed_seconds: float) -> float:
        """The prediction: the kernels streaming the weights, plus the fixed per-step cost."""
        return self.kernel_step_seconds + fixed_seconds


def predict(model, config, hardware: HardwareProfile, context: int, prefill_chunk: int,
            kv_bytes: int = 4) -> Prediction:
    """The roofline of a decode step and of prefill at PROMPT_LENGTHS; kv_bytes: the KV
    cache's element size (KVCache.element_size)."""
    step = decode_cost(model, config, batch=1, context=context, kv_bytes=kv_bytes)
    seconds = hardware.floor_seconds(step.bytes, step.flops)
    kernel = sum(hardware.kernel_seconds(row.bytes, row.flops, row.ggml_type) for row in step.rows)
    ttft = {}
    for length in PROMPT_LENGTHS:
        prefill = prefill_cost(model, config, length, prefill_chunk, kv_bytes=kv_bytes)
        ttft[length] = hardware.floor_seconds(prefill.bytes, prefill.flops)
    return Prediction(1 / seconds, seconds, ttft, kernel)


def cost_table(cost: StepCost, hardware: HardwareProfile) -> Table:
    table = Table(title=f"one decode step at batch 1 on {hardware.name}")
    for column in ("part", "MB moved", "MFLOP", "floor ms", "share"):
        table.add_column(column, justify="left" if column == "part" else "right")
    total = hardware.floor_seconds(cost.bytes, cost.flops)
    for row in group_rows(cost):
        seconds = hardware.floor_seconds(row.bytes, row.flops)
        table.add_row(row.name, f"{row.bytes / 1e6:.2f}", f"{row.flops / 1e6:.1f}",
                      f"{seconds * 1e3:.3f}", f"{seconds / total:.0%}")
    table.add_row("total", f"{cost.bytes / 1e6:.2f}", f"{cost.flops / 1e6:.1f}", f"{total * 1e3:.3f}", "100%")
    return table


def threads_line(requested: int | None, cpus: CpuBudget) -> str:
    """Where the thread count came from: --threads, or the CPUs this process may use."""
    if requested:
        return f"threads: {requested}, from --threads; usable: {cpus.describe()}"
    return f"threads: {cpus.threads}, one per usable CPU and at most one per core: {cpus.describe()}"


def add_plan_parser(commands) -> None:
    plan = commands.add_parser("plan", help="bytes, FLOPs and the fastest this machine could run the model")
    plan.add_argument("--model", help="a .gguf file or a Hugging Face folder (default: the default model)")
    plan.add_argument("--threads", type=int,
                      help="CPU threads for the probe (default: one per CPU this process may use)")
    plan.add_argument("--context", type=int, default=512, help="cached tokens per decode step (512)")
    plan.add_argument("--weights", choices=WEIGHT_MODES, default="auto")
    plan.add_argument("--hardware", choices=["probe", *datasheet_profiles()], default="probe",
                      help="measure this CPU (default) or use a GPU datasheet profile")
    from hayate.cli import add_kv_cache_option

    add_kv_cache_option(plan)


def command_plan(args: argparse.Namespace) -> int:
    config = EngineConfig(model=args.model, threads=args.threads, weights=args.weights,
                          kv_cache_dtype=args.kv_cache_dtype, show_progress=True)
    torch.set_num_threads(thread_count(config.threads))
    loaded = load_model(config)
    hardware = probe_cpu(config.threads, types=packed_types(loaded.model)) if args.hardware == "probe" else datasheet_profiles()[args.hardware]
    console = Console()
    console.print(threads_line(config.threads, usable_cpus()))
    console.print(f"{loaded.path.name}: {loaded.config.model_type}, {loaded.config.num_hidden_layers} layers; "
                  f"{hardware.name}: {hardware.bandwidth / 1e9:.1f} GB/s read, {hardware.flops / 1e9:.0f} GFLOP/s")
    kv_dtype = kv_cache_dtype(config.kv_cache_dtype, next(loaded.model.parameters()).dtype)
    kv_bytes = kv_dtype.itemsize
    console.print(cost_table(decode_cost(loaded.model, loaded.config, 1, args.context, kv_bytes), hardware))
    held = memory_by_format(loaded.model)
    kv_token = KVCache.bytes_per_token(loaded.config, kv_dtype) / 1024
    console.print("weights in memory: " + ", ".join(f"{n / 1e6:.1f} MB {kind}" for kind, n in held.items())
                  + f" (weights {config.weights}); KV cache {kv_token:.3g} KB a token "
                  f"({str(kv_dtype).removeprefix('torch.')})")
    console.print(f"decode: {decode_path(loaded.model)}")
    floor = predict(loaded.model, loaded.config, hardware, args.context, config.prefill_chunk, kv_bytes)
    console.print(f"floor: {floor.decode_tokens_per_second:.0f} tokens/s decode at batch 1 "
                  f"({floor.decode_step_seconds * 1e3:.2f} ms a token: bytes and FLOPs only)")
    if args.hardware == "probe":
        dispatch = dispatch_seconds(loaded, args.context, config.kv_cache_dtype)
        step = floor.expected_step_seconds(dispatch)
        console.print(f"predicted: {1 / step:.0f} tokens/s decode at batch 1 ({step * 1e3:.2f} ms a token: "
                      f"{floor.kernel_step_seconds * 1e3:.2f} ms streaming the weights at the kernels' measured "
                      f"rates, {dispatch * 1e3:.2f} ms fixed per-step cost measured on a shrunken twin of the model)")
    for length, seconds in floor.time_to_first_token.items():
        console.print(f"floor: time to first token for a {length}-token prompt: {seconds * 1e3:.1f} ms")
    return 0
