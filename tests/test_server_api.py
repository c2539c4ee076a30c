"""hayate serve through the official `openai` package: chat and text completions, streaming and
not, n, logprobs, stop strings, seeds, GroqCloud usage fields, and the status routes."""
from __future__ import annotations

import httpx
import pytest

from server_harness import tiny_server
from tiny_models import make_tiny_model

from hayate.server.responses import (ChatChunkChoice, ChatCompletionChunk, ChatDelta, Completion, CompletionChoice,
                                     ResponseMeta, TextChunks)

GREEDY = {"temperature": 0, "max_tokens": 24, "extra_body": {"ignore_eos": True}}
HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-chat")
    make_tiny_model("llama", folder)
    running = tiny_server(folder)
    yield running
    running.stop()


def chat(client, model, messages=HELLO, **options):
    options = {**GREEDY, **options}
    return client.chat.completions.create(model=model, messages=messages, **options)


def streamed_text(chunks) -> tuple[str, list]:
    chunks = list(chunks)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def test_models_lists_the_one_served_model(client, server, model):
    models = client.models.list().data
    assert [m.id for m in models] == [model] == [server.state.model.name]
    assert model.startswith("tiny-chat") and models[0].context_window == 256
    assert client.models.retrieve(model).id == model


def test_chat_answer_with_usage_and_groq_timings(client, model):
    answer = chat(client, model, extra_body={"ignore_eos": True, "return_token_ids": True})
    choice = answer.choices[0]
    assert answer.object == "chat.completion" and answer.model == model
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    usage = answer.usage
    assert usage.completion_tokens == len(choice.token_ids) == 24
    assert usage.prompt_tokens == len(answer.prompt_token_ids)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    for name in ("queue_time", "prompt_time", "completion_time", "total_time"):
        assert getattr(usage, name) >= 0
    assert usage.total_time == pytest.approx(usage.prompt_time + usage.completion_time)
    assert answer.x_groq["id"] == answer.id


def test_stream_matches_the_whole_answer(client, model):
    whole = chat(client, model).choices[0].message.content
    text, chunks = streamed_text(chat(client, model, stream=True))
    assert text == whole
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    usage = chunks[-1].x_groq["usage"]   # GroqCloud's place for it
    assert usage["completion_tokens"] == 24 and usage["total_time"] >= usage["completion_time"]


TRICKY_TEXTS = ["", "plain", 'say "hi" \\ there', "\n\t\r\b\f", "\x00\x01\x1f\x7f", "é 漢字 🙂",
                "\u2028\u2029 </script>", "".join(map(chr, range(0x3000)))]


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_text_chunks_write_what_pydantic_writes(kind):
    meta = ResponseMeta.new("x", 'model "with" quotes')
    if kind == "chat":
        def render(index, text):
            return ChatCompletionChunk(**meta.fields(), choices=[ChatChunkChoice(index=index, delta=ChatDelta(content=text))])
    else:
        def render(index, text):
            return Completion(**meta.fields(), choices=[CompletionChoice(index=index, text=text, finish_reason=None)])
    chunks = TextChunks(render)
    for index in (0, 3, 0):
        for text in TRICKY_TEXTS:
            assert chunks(index, text) == render(index, text).model_dump_json()


def test_streamed_choices_match_the_whole_answer(client, model):
    options = {"temperature": 1.0, "n": 2, "seed": 3, "max_tokens": 12, "extra_body": {"ignore_eos": True}}
    whole = [choice.message.content for choice in chat(client, model, **options).choices]
    texts = ["", ""]
    for chunk in chat(client, model, stream=True, **options):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == whole


def test_stream_usage_chunk_with_include_usage(client, model):
    _, chunks = streamed_text(chat(client, model, stream=True, stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 24
    assert last.usage.queue_time >= 0 and last.x_groq["usage"]["prompt_tokens"] == last.usage.prompt_tokens
    assert all(chunk.usage is None for chunk in chunks[:-1])


def test_text_parts_and_multi_turn_history(client, model):
    as_parts = [{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}]
    assert chat(client, model, as_parts).choices[0].message.content == chat(client, model).choices[0].message.content
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "And now?"}]
    long_answer = chat(client, model, history)
    assert long_answer.usage.prompt_tokens > chat(client, model).usage.prompt_tokens + 10


def test_n_choices_are_reproducible_with_a_seed(client, model):
    options = {"temperature": 1.0, "n": 3, "seed": 7, "max_tokens": 16,
               "extra_body": {"ignore_eos": True, "return_token_ids": True}}
    first, second = chat(client, model, **options), chat(client, model, **options)
    ids = [choice.token_ids for choice in first.choices]
    assert [choice.index for choice in first.choices] == [0, 1, 2]
    assert ids == [choice.token_ids for choice in second.choices]
    assert len({tuple(i) for i in ids}) == 3, "each choice has its own seed"
    alone = chat(client, model, **{**options, "n": 1, "seed": 8})
    assert alone.choices[0].token_ids == ids[1], "choice i uses seed + i"
    assert first.usage.completion_tokens == 48


def test_chat_logprobs(client, model):
    answer = chat(client, model, logprobs=True, top_logprobs=3, max_tokens=8)
    entries = answer.choices[0].logprobs.content
    assert len(entries) == 8
    for entry in entries:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)   # greedy: the top one
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert entry.bytes == list(entry.token.encode())


def test_stop_string_cuts_the_answer(client, model):
    text = chat(client, model, max_tokens=60).choices[0].message.content
    visible = text.rstrip()
    assert len(visible) >= 6, f"the tiny model said too little: {text!r}"
    stop = visible[len(visible) // 2: len(visible) // 2 + 2]
    expected = text[: text.find(stop)]
    answer = chat(client, model, max_tokens=60, stop=[stop, "never appears"])
    assert answer.choices[0].message.content == expected
    assert answer.choices[0].finish_reason == "stop"
    streamed, _ = streamed_text(chat(client, model, max_tokens=60, stop=stop, stream=True))
    assert streamed == expected


def test_logit_bias_and_hayate_sampling_extensions(client, server, model):
    token_a = server.state.model.tokenizer.encode("A", add_special_tokens=False)[0]
    forced = chat(client, model, max_tokens=5, temperature=1.0, logit_bias={str(token_a): 100}, user="tester")
    assert forced.choices[0].message.content == "AAAAA"
    greedy = chat(client, model).choices[0].message.content
    top_k_one = chat(client, model, temperature=1.0, extra_body={"top_k": 1, "min_p": 0.0,
                                                                 "repetition_penalty": 1.0, "ignore_eos": True})
    assert top_k_one.choices[0].message.content == greedy


def test_completions_from_text_and_from_token_ids(client, model):
    options = {"model": model, "max_tokens": 12, "temperature": 0,
               "extra_body": {"ignore_eos": True, "return_token_ids": True}}
    from_text = client.completions.create(prompt="Once upon a time", **options).choices[0]
    from_ids = client.completions.create(prompt=from_text.prompt_token_ids, **options).choices[0]
    assert from_ids.text == from_text.text and from_ids.token_ids == from_text.token_ids
    chunks = list(client.completions.create(prompt="Once upon a time", stream=True, **options))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == from_text.text
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].x_groq["usage"]["completion_tokens"] == 12


def test_completions_logprobs_and_several_prompts(client, model):
    answer = client.completions.create(model=model, prompt=["one", "two"], max_tokens=6, temperature=0,
                                       logprobs=2, n=2, extra_body={"ignore_eos": True})
    assert [choice.index for choice in answer.choices] == [0, 1, 2, 3]
    assert answer.choices[0].text == answer.choices[1].text   # greedy, same prompt
    logprobs = answer.choices[2].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 6
    assert all(1 <= len(top) <= 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset == sorted(logprobs.text_offset) and logprobs.text_offset[0] == 0
    assert answer.usage.completion_tokens == 24


def test_status_routes(server):
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    metrics = httpx.get(f"{server.url}/metrics").text
    for name in ("hayate_time_to_first_token_seconds_bucket", "hayate_inter_token_latency_seconds",
                 "hayate_e2e_request_latency_seconds", "hayate_request_queue_time_seconds",
                 "hayate_num_running_requests", "hayate_num_waiting_requests", "hayate_kv_cache_usage_ratio",
                 "hayate_prefix_cache_hit_ratio",
                 "hayate_prompt_tokens_total", "hayate_generation_tokens_total"):
        assert name in metrics
    assert "text/html" in httpx.get(f"{server.url}/docs").headers["content-type"]
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"} <= set(paths)
    assert "422" not in paths["/v1/chat/completions"]["post"]["responses"]   # bad requests get 400


def test_token_metrics_count_every_token(client, server, model):
    """Token counts and gaps reach /metrics in batches; after the request, all of them."""
    from prometheus_client.parser import text_string_to_metric_families

    def samples():
        text = httpx.get(f"{server.url}/metrics").text
        return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}

    before = samples()
    streamed_text(chat(client, model, stream=True, max_tokens=37, extra_body={"ignore_eos": True}))
    after = samples()
    assert after["hayate_generation_tokens_total"] - before["hayate_generation_tokens_total"] == 37
    assert after["hayate_inter_token_latency_seconds_count"] - before["hayate_inter_token_latency_seconds_count"] == 36
    assert after["hayate_time_to_first_token_seconds_count"] - before["hayate_time_to_first_token_seconds_count"] == 1


def test_usage_reports_prompt_tokens_from_the_prefix_cache(client, model):
    conversation = [{"role": "user", "content": "Tell me about the sea, the wind and the lighthouse. " * 4}]
    first, second = chat(client, model, conversation), chat(client, model, conversation)
    assert second.choices[0].message.content == first.choices[0].message.content
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < second.usage.prompt_tokens and cached % 16 == 0
    streamed = list(chat(client, model, conversation, stream=True, stream_options={"include_usage": True}))
    assert streamed[-1].usage.prompt_tokens_details.cached_tokens == cached
