"""SamplingParams validation and the streaming stop-string matcher."""
import math

import pytest

from hayate.sampling import SamplingParams, StopStringMatcher


def test_defaults_are_valid_and_not_greedy():
    params = SamplingParams()
    assert params.stop == [] and params.logit_bias == {} and not params.greedy


def test_greedy_when_temperature_zero_or_top_k_one():
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=0.7, top_k=1).greedy
    assert not SamplingParams(temperature=0.7, top_k=2).greedy


def test_normalises_stop_and_logit_bias():
    params = SamplingParams(stop="\n\n", logit_bias={"42": 5, 7: -100}, stop_token_ids=(3,))
    assert params.stop == ["\n\n"]
    assert params.logit_bias == {42: 5.0, 7: -100.0}
    assert params.stop_token_ids == [3]


@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0), ("max_tokens", -1), ("max_tokens", 1.5), ("max_tokens", True),
    ("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf),
    ("temperature", 101.0), ("temperature", "hot"),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", math.nan),
    ("top_k", -2), ("top_k", 2.5),
    ("min_p", -0.1), ("min_p", 1.5),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", math.inf),
    ("presence_penalty", 2.5), ("presence_penalty", -2.5),
    ("frequency_penalty", 3.0), ("frequency_penalty", math.nan),
    ("seed", 1.5), ("seed", "7"),
    ("stop", [""]), ("stop", ["x"] * 17), ("stop", [1]), ("stop", 5),
    ("stop_token_ids", [-1]), ("stop_token_ids", ["a"]),
    ("logprobs", -1), ("logprobs", 21), ("logprobs", 2.0),
    ("logit_bias", {5: 101}), ("logit_bias", {5: math.nan}), ("logit_bias", {-1: 1.0}),
    ("logit_bias", {"abc": 1.0}), ("logit_bias", [1, 2]),
])
def test_bad_field_raises_naming_it(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_error_message_shows_the_bad_value():
    with pytest.raises(ValueError, match=r"max_tokens must be .*>= 1, got -1"):
        SamplingParams(max_tokens=-1)


def test_accepts_the_edges():
    SamplingParams(temperature=0, top_p=1.0, top_k=-1, min_p=1.0, presence_penalty=-2,
                   frequency_penalty=2, logprobs=20, stop=["a"] * 16, seed=-5,
                   logit_bias={1: -100, 2: 100})


def test_check_vocab_names_out_of_range_ids():
    SamplingParams(stop_token_ids=[9]).check_vocab(10)
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=[10]).check_vocab(10)
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={10: 1.0}).check_vocab(10)


def feed_all(matcher, deltas):
    """Feed deltas until a stop; return (emitted text, stopped, deltas consumed)."""
    emitted = ""
    for count, delta in enumerate(deltas, 1):
        text, stopped = matcher.feed(delta)
        emitted += text
        if stopped:
            return emitted, True, count
    return emitted + matcher.flush(), False, len(deltas)


def test_no_stops_passes_text_through():
    matcher = StopStringMatcher([], include_stop=False)
    assert matcher.feed("hello") == ("hello", False)
    assert matcher.flush() == ""


def test_stop_split_across_two_deltas():
    matcher = StopStringMatcher(["STOP"], include_stop=False)
    assert matcher.feed("hello ST") == ("hello ", False)
    assert matcher.feed("OP and more") == ("", True)


def test_stop_split_across_three_deltas():
    assert feed_all(StopStringMatcher(["<end>"]), ["ab<", "en", "d>tail"]) == ("ab", True, 3)


def test_held_text_is_released_when_it_is_not_a_stop():
    matcher = StopStringMatcher(["STOP"], include_stop=False)
    assert matcher.feed("a ST") == ("a ", False)
    assert matcher.feed("O") == ("", False)
    assert matcher.feed("RY") == ("STORY", False)


def test_partial_stop_held_until_flush():
    matcher = StopStringMatcher(["STOP"], include_stop=False)
    assert matcher.feed("end ST") == ("end ", False)
    assert matcher.flush() == "ST"
    assert matcher.flush() == ""


def test_earliest_of_several_stops_wins():
    matcher = StopStringMatcher(["\n\n", "END"], include_stop=False)
    assert matcher.feed("one END two\n\nthree") == ("one ", True)
    matcher = StopStringMatcher(["END", "\n\n"], include_stop=True)
    assert matcher.feed("one\n\ntwo END") == ("one\n\n", True)


def test_result_does_not_depend_on_delta_split():
    stops = ["xyz", "y"]
    whole = feed_all(StopStringMatcher(stops), ["axyzb"])[0]
    by_char = feed_all(StopStringMatcher(stops), list("axyzb"))[0]
    assert whole == by_char == "ax"


def test_include_stop_emits_the_stop_string():
    matcher = StopStringMatcher(["</s>"], include_stop=True)
    assert feed_all(matcher, ["abc</", "s>", "ignored"]) == ("abc</s>", True, 2)


def test_feed_after_stop_emits_nothing():
    matcher = StopStringMatcher(["x"], include_stop=False)
    assert matcher.feed("axb") == ("a", True)
    assert matcher.feed("more") == ("", True)
    assert matcher.flush() == ""


def test_unicode_stop_string():
    matcher = StopStringMatcher(["終わり"], include_stop=False)
    assert feed_all(matcher, ["こんにちは終", "わ", "り。次"]) == ("こんにちは", True, 3)


def test_stop_overlapping_its_own_prefix():
    # "aab" after "aaab": the hold-back must keep enough of the "aa" run
    assert feed_all(StopStringMatcher(["aab"]), ["xa", "a", "a", "b"]) == ("xa", True, 4)
