"""hayate bench on a tiny random model: ordered figures, exact prompt lengths, the JSON and
PNG it writes, and the peer runners' result parsing and failure reporting (fake workers,
never the real peers). No timing thresholds."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from hayate.bench.offline import HayateContender, build_prompt, plan_floor, plan_lengths
from hayate.bench.peers import environment_problem, parse_selection
from hayate.bench.plot import draw_png, draw_serving_png
from hayate.bench.report import BenchReport, notes, to_json
from hayate.bench.rounds import run_rounds
from hayate.bench.timings import EngineResult, RawTimings, percentile, summarize
from hayate.cli import main
from hayate.llm import LLM
from tiny_models import make_tiny_model

ENGINE_KEYS = {"status", "error", "load_s", "ttft_ms", "decode_tokens_per_s", "itl_ms", "itl_p99_over_p50",
               "decode_tokens", "decode_prompt_length", "itl_samples_ms"}
TOP_KEYS = {"model", "threads", "weights", "kv_cache_dtype", "speculative", "prompt_lengths", "decode_tokens", "decode_prompt_length",
            "repeats", "statistic", "engines", "ratios", "ratios_by_round", "plan", "environment"}


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    make_tiny_model("llama", folder)
    return folder, LLM(str(folder), threads=1)


def test_prompts_have_exactly_the_requested_lengths(tiny_llm):
    _, llm = tiny_llm
    for length in (1, 7, 64, 200):
        prompt = build_prompt(llm.tokenizer, length)
        assert len(prompt) == length and all(0 <= token < 320 for token in prompt)


def test_a_vocabulary_without_the_text_is_an_error_not_a_hang():
    class Empty:   # a file whose tokens cover none of the bench's text
        add_bos_token, bos_token_id = True, 1

        def encode(self, text, add_special_tokens=False):
            return []

    with pytest.raises(ValueError, match="into no tokens"):
        build_prompt(Empty(), 32)


def test_lengths_are_capped_to_the_context():
    plan = plan_lengths([16, 512, 2048], decode_tokens=8, repeats=1, max_model_len=256, progress=lambda _: None)
    assert plan.prompt_lengths == [16, 254] and plan.decode_prompt_length == 16
    with pytest.raises(ValueError):
        plan_lengths([16], decode_tokens=300, repeats=1, max_model_len=256)


def measure_hayate(llm: LLM, plan) -> EngineResult:
    prompts = {length: build_prompt(llm.tokenizer, length) for length in plan.prompt_lengths}
    decode_prompt = build_prompt(llm.tokenizer, plan.decode_prompt_length)
    contender = HayateContender(llm, plan.decode_tokens, load_s=0.5)
    return run_rounds([contender], prompts, decode_prompt, plan.repeats, progress=lambda _: None)[0]


def test_offline_measurement_is_ordered_and_complete(tiny_llm):
    _, llm = tiny_llm
    plan = plan_lengths([8, 16], decode_tokens=12, repeats=2, max_model_len=llm.engine.max_model_len)
    result = measure_hayate(llm, plan)
    assert set(result.ttft_rounds_ms) == {8, 16} and all(len(v) == 2 for v in result.ttft_rounds_ms.values())
    assert len(result.decode_rounds_tokens_per_s) == 2 and result.load_s == 0.5
    assert result.decode_tokens == 12 and result.decode_tokens_per_s > 0
    assert all(ms > 0 for ms in result.ttft_ms.values())
    assert 0 <= result.itl_ms["p50"] <= result.itl_ms["p90"] <= result.itl_ms["p99"]
    floor = plan_floor(llm, 1, plan)
    assert floor.decode_tokens_per_s > 0 and set(floor.ttft_ms) == {8, 16}
    assert floor.machine_jitter >= 1.0   # the machine's own p99/p50 for the same work, repeated


def test_summary_of_known_times():
    raw = RawTimings({4: [0.3, 0.1, 0.2]}, [[0.1, 0.2, 0.4, 0.5], [0.1, 0.3, 0.5, 0.7]], decode_prompt_length=4)
    result = summarize("x", raw)
    assert result.ttft_ms[4] == pytest.approx(200)
    assert result.decode_tokens_per_s == pytest.approx((3 / 0.4 + 3 / 0.6) / 2)
    assert result.itl_samples_ms == pytest.approx([200, 200, 200])      # the slower run is the median one
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 99) == 5


def test_json_and_png(tiny_llm, tmp_path):
    _, llm = tiny_llm
    plan = plan_lengths([8], decode_tokens=6, repeats=1, max_model_len=llm.engine.max_model_len)
    hayate = measure_hayate(llm, plan)
    peer = summarize("llama.cpp", RawTimings({8: [0.01]}, [[0.01, 0.02, 0.03]], 8))
    report = BenchReport("tiny", 1, "auto", plan, [hayate, peer], plan_floor(llm, 1, plan))
    data = json.loads(json.dumps(to_json(report)))
    assert TOP_KEYS <= set(data) and ENGINE_KEYS <= set(data["engines"]["hayate"])
    assert data["ratios"]["llama.cpp"]["decode_tokens_per_s"] > 0
    assert {"decode_tokens_per_s", "ttft_ms", "decode_percent_of_floor"} <= set(data["plan"])
    assert any(line.startswith("plan predicted") for line in notes(report))
    draw_png(report.engines, tmp_path / "bench.png", "tiny")
    with Image.open(tmp_path / "bench.png") as image:
        assert image.format == "PNG" and image.size[0] > 0


def test_bench_command_end_to_end(tiny_llm, tmp_path, capsys):
    folder, _ = tiny_llm
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    code = main(["bench", "--model", str(folder), "--threads", "1", "--prompt-lengths", "8,16",
                 "--decode-tokens", "8", "--repeats", "1", "--kv-cache-dtype", "float16", "--speculative", "ngram",
                 "--json", str(out_json), "--plot", str(out_png)])
    assert code == 0
    data = json.loads(out_json.read_text())
    assert data["kv_cache_dtype"] == "float16" and data["speculative"] == "ngram"
    assert data["engines"]["hayate"]["decode_tokens"] == 8 and data["prompt_lengths"] == [8, 16]
    out = capsys.readouterr().out
    assert "decode tok/s" in out and "plan predicted" in out
    with Image.open(out_png) as image:
        assert image.format == "PNG"


def test_unknown_peer_is_a_usage_error(capsys):
    assert main(["bench", "--compare", "vllm"]) == 2
    assert "unknown engine" in capsys.readouterr().err
    assert parse_selection("llama.cpp, transformers,llama.cpp") == ["llama.cpp", "transformers"]
    assert main(["bench", "--json", "/no/such/folder/out.json"]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_missing_peer_environment_says_make_bench_env(tmp_path):
    problem = environment_problem("llama.cpp", tmp_path / "m.gguf", tmp_path / "no-venv" / "python")
    assert "make bench-env" in problem
    assert "gguf" in environment_problem("llama.cpp", tmp_path, tmp_path / "python")


def test_peers_run_without_hayates_libgomp_setting(monkeypatch):
    """hayate shortens libgomp's spinning for itself (hayate/__init__.py); a peer it starts
    gets libgomp's own default, unless the user chose a value."""
    from hayate.bench.peers import peer_environment

    monkeypatch.setenv("GOMP_SPINCOUNT", "20000")
    monkeypatch.setenv("HAYATE_SET_GOMP_SPINCOUNT", "1")
    assert "GOMP_SPINCOUNT" not in peer_environment() and "HAYATE_SET_GOMP_SPINCOUNT" not in peer_environment()
    monkeypatch.delenv("HAYATE_SET_GOMP_SPINCOUNT")
    assert peer_environment()["GOMP_SPINCOUNT"] == "20000"


def test_the_serving_plot_draws_each_server_against_concurrency(tmp_path):
    def level(users: int, rate: float) -> dict:
        return {"concurrency": users, "output_tokens_per_s": rate, "ttft_ms": {"p50": 40.0 * users},
                "itl_ms": {"p50": 5.0, "p99": 9.0}}

    reports = {"hayate": {"levels": [level(1, 200.0), level(4, 500.0)]},
               "llama.cpp": {"levels": [level(4, 150.0), level(1, 80.0)]}}
    draw_serving_png(reports, tmp_path / "serving.png", "tiny")
    with Image.open(tmp_path / "serving.png") as image:
        assert image.format == "PNG" and image.size[0] > 0
