"""Constrained decoding in the engine, on a tiny random model: whatever the weights, every
output follows its grammar and ends with "stop"; masks leave unconstrained rows alone;
seeded outputs do not depend on the batch; fast-forward does not change greedy output."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from hayate.llm import LLM
from hayate.sampling import SamplingParams
from hayate.structured import GrammarError, GrammarSpec
from hayate.structured.requests import choice, grammar, json_object, json_schema, regex
from structured_schemas import SCHEMAS
from tiny_models import make_tiny_model

SEEDS = range(5)
PERSON = SCHEMAS[0]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-structured")
    make_tiny_model("llama", folder)
    return str(folder)


@pytest.fixture(scope="module")
def llm(model_folder):
    return LLM(model_folder, max_num_seqs=32)


def sampled(spec: GrammarSpec, seed: int, **extra) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 200, "temperature": 1.0, "seed": seed, "grammar": spec, **extra})


@pytest.mark.parametrize("backend", ["auto", "llguidance"])
def test_forty_schemas_five_seeds_all_valid(llm, model_folder, backend):
    """auto: xgrammar fills the masks of the schemas it takes (structured/xgrammar_backend.py)."""
    if backend != "auto":
        llm = LLM(model_folder, max_num_seqs=32, grammar_backend=backend)
    params = [sampled(json_schema(schema), seed) for schema in SCHEMAS for seed in SEEDS]
    results = llm.generate(["Answer in JSON:"] * len(params), params)
    failures = []
    for index, result in enumerate(results):
        schema = SCHEMAS[index // len(SEEDS)]
        try:
            jsonschema.validate(json.loads(result.text), schema)
            assert result.finish_reason == "stop", result.finish_reason
        except Exception as error:
            failures.append((index // len(SEEDS), result.text, result.finish_reason, str(error)[:120]))
    assert not failures, failures
    assert len(results) == 200


def test_regex_choice_lark_gbnf(llm):
    specs = [regex(r"[a-z]{2,5}-[0-9]{2}"), choice(["alpha", "beta", "gamma delta"]),
             grammar('start: "x=" NUM ("," NUM)?\nNUM: /[0-9]{1,3}/'),
             grammar('root ::= "yes" | "no"')]   # llama.cpp GBNF, converted
    checks = [lambda text: re.fullmatch(r"[a-z]{2,5}-[0-9]{2}", text),
              lambda text: text in ("alpha", "beta", "gamma delta"),
              lambda text: re.fullmatch(r"x=[0-9]{1,3}(,[0-9]{1,3})?", text),
              lambda text: text in ("yes", "no")]
    for spec, check in zip(specs, checks):
        for result in llm.generate(["go"] * 5, [sampled(spec, seed) for seed in SEEDS]):
            assert check(result.text), (spec, result.text)
            assert result.finish_reason == "stop"


def test_json_object_is_closed_within_max_tokens_or_cut_by_length(llm):
    """Any-JSON-object grammars may run long on random weights; a cut is a "length" finish."""
    for result in llm.generate(["go"] * 5, [sampled(json_object(), seed, max_tokens=40) for seed in SEEDS]):
        assert result.text.startswith("{")
        assert result.finish_reason in ("stop", "length")
        if result.finish_reason == "stop":
            assert isinstance(json.loads(result.text), dict)


def test_seeded_constrained_output_is_batch_invariant(model_folder):
    params = [sampled(json_schema(PERSON), seed) for seed in SEEDS]
    batched = LLM(model_folder, max_num_seqs=8).generate(["hi"] * 5, params)
    single = LLM(model_folder, max_num_seqs=1)
    alone = [single.generate("hi", p) for p in params]
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]


def test_mixed_batch_leaves_unconstrained_rows_identical(model_folder):
    free = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    free_seeded = SamplingParams(max_tokens=24, temperature=0.8, seed=7, ignore_eos=True)
    prompts = ["one", "two", "three", "four"]
    llm = LLM(model_folder, max_num_seqs=8)
    before = [r.token_ids for r in llm.generate(prompts, [free, free_seeded, free, free_seeded])]
    mixed = llm.generate(prompts + ["c1", "c2", "c3"],
                         [free, free_seeded, free, free_seeded] + [sampled(json_schema(PERSON), s) for s in SEEDS[:3]])
    assert [r.token_ids for r in mixed[:4]] == before
    for result in mixed[4:]:
        jsonschema.validate(json.loads(result.text), PERSON)


@pytest.mark.parametrize("schema_index", [0, 9, 13, 14, 21, 32, 39])
def test_fast_forward_keeps_greedy_output(model_folder, schema_index):
    """The tiny byte-level vocabulary tokenizes forced text one way only, so forced tokens
    are exactly what greedy decoding would have picked: the outputs must be identical."""
    params = SamplingParams(max_tokens=200, temperature=0, grammar=json_schema(SCHEMAS[schema_index]))
    outputs = {}
    for fast_forward in (False, True):
        llm = LLM(model_folder, max_num_seqs=4, grammar_fast_forward=fast_forward)
        outputs[fast_forward] = [r.token_ids for r in llm.generate(["a", "bb", "ccc"], params)]
    assert outputs[True] == outputs[False]


def test_fast_forward_runs_fewer_steps(model_folder):
    params = SamplingParams(max_tokens=200, temperature=0, grammar=json_schema(SCHEMAS[32]))
    steps = {}
    for fast_forward in (False, True):
        llm = LLM(model_folder, grammar_fast_forward=fast_forward)
        count, original = [0], llm.engine.step

        def counted():
            count[0] += 1
            return original()
        llm.engine.step = counted
        steps[fast_forward] = (count[0], llm.generate("x", params))
        steps[fast_forward] = (count[0], steps[fast_forward][1])
    assert steps[True][1].token_ids == steps[False][1].token_ids
    assert steps[True][0] < steps[False][0] * 0.8, steps


def test_max_tokens_mid_grammar_is_length(llm):
    result = llm.generate("x", sampled(json_schema(PERSON), 0, max_tokens=5))
    assert result.finish_reason == "length" and len(result.token_ids) == 5


def test_logprobs_are_of_the_masked_distribution(llm):
    result = llm.generate("x", sampled(choice(["yes", "no"]), 0, logprobs=3))
    first = result.logprobs[0]
    allowed = {llm.tokenizer.encode(word, add_special_tokens=False)[0] for word in ("yes", "no")}
    assert first.token_id in allowed
    assert {token for token, _ in first.top} == allowed   # the rest is masked away
    assert sum(2.718281828 ** value for _, value in first.top) == pytest.approx(1.0, abs=1e-4)


def test_stop_strings_and_eos_still_end_constrained_requests(llm):
    result = llm.generate("x", SamplingParams(max_tokens=50, temperature=0, stop=["-"],
                                              grammar=regex(r"[a-c]{3}-[0-9]{3}")))
    assert result.finish_reason == "stop" and "-" not in result.text


@pytest.mark.parametrize("spec, words", [
    (GrammarSpec("json_schema", '{"type": "array", "uniqueItems": true}'), "uniqueItems"),
    (GrammarSpec("json_schema", '{"type": "strin"}'), "strin"),
    (GrammarSpec("json_schema", "{not json"), "not valid JSON"),
    (GrammarSpec("json_schema", json.dumps({"enum": list(range(5000))})), "enum"),
    (GrammarSpec("regex", "[a-"), "regex"),
    (GrammarSpec("regex", "a" * 5000), "limit"),
    (GrammarSpec("lark", "start: ("), "Expected token"),
    (GrammarSpec("choice", "[]"), "choice"),
])
def test_unusable_grammars_are_refused_before_admission(llm, spec, words):
    with pytest.raises(GrammarError, match=re.escape(words)):
        llm.engine.validate_request([1, 2], SamplingParams(grammar=spec))
    assert not llm.engine.has_unfinished()


def test_lenient_schema_ignores_unsupported_keywords(llm):
    spec = json_schema({"type": "array", "items": {"type": "boolean"}, "maxItems": 2, "uniqueItems": True},
                       strict=False)
    result = llm.generate("x", sampled(spec, 0))
    assert isinstance(json.loads(result.text), list)


def test_cli_run_with_regex_and_json_schema(model_folder, tmp_path, capsys):
    from hayate.cli import main

    assert main(["run", "hi", "--model", model_folder, "--regex", "[a-c]{3}-[0-9]", "--max-tokens", "20"]) == 0
    assert re.fullmatch(r"[a-c]{3}-[0-9]", capsys.readouterr().out.strip())
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(PERSON))
    assert main(["run", "hi", "--model", model_folder, "--json-schema", str(schema), "--max-tokens", "150"]) == 0
    jsonschema.validate(json.loads(capsys.readouterr().out.strip()), PERSON)
    schema.write_text('{"type": "strin"}')
    assert main(["run", "hi", "--model", model_folder, "--json-schema", str(schema)]) != 0
    assert "strin" in capsys.readouterr().err
