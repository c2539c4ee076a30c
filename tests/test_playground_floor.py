"""The live floor without a server: the plan's floor kept as a few numbers, read back at any
context or prompt length, a request's share of it, and GPU names matched to their datasheets."""
from __future__ import annotations

import pytest

from hayate.engine.request import RequestOutput, RequestTimings
from hayate.plan.hardware import datasheet_profiles
from hayate.server.floor import LiveFloor, datasheet_for, floor_share

FLOOR = LiveFloor("a test machine", max_context=1001, decode_step_seconds=(0.010, 0.020),
                  prefill_seconds=((32, 0.01), (512, 0.1), (2048, 0.5)))


def finished(prompt: int, output: int, cached: int = 0, scheduled: float = 1.0, first: float = 1.5,
             end: float = 2.5) -> RequestOutput:
    timings = RequestTimings(arrival=0.5, first_scheduled=scheduled, first_token=first, finished=end)
    return RequestOutput("r", "", [], True, "length", prompt, output, timings, num_cached_tokens=cached)


def test_decode_floor_is_linear_in_context():
    assert FLOOR.decode_seconds(1) == pytest.approx(0.010)
    assert FLOOR.decode_seconds(501) == pytest.approx(0.015)
    assert FLOOR.decode_seconds(1001) == pytest.approx(0.020)
    assert FLOOR.decode_seconds(2001) == pytest.approx(0.030)   # the same line past the model's context
    assert FLOOR.decode_tokens_per_second(1) == pytest.approx(100)


def test_prefill_floor_goes_through_the_plans_prompt_lengths():
    assert FLOOR.prompt_seconds(32) == pytest.approx(0.01)
    assert FLOOR.prompt_seconds(16) == pytest.approx(0.005)      # from (0, 0)
    assert FLOOR.prompt_seconds(1280) == pytest.approx(0.3)      # between 512 and 2048
    assert FLOOR.prompt_seconds(3584) == pytest.approx(0.9)      # the last piece, extended
    assert FLOOR.prefill_tokens_per_second(512) == pytest.approx(5120)


def test_a_requests_share_is_floor_seconds_over_seconds_taken():
    output = finished(prompt=401, output=201)   # 200 decode steps in 1 s at a mean context of 501.5
    assert FLOOR.decode_share(output) == pytest.approx(200 * FLOOR.decode_seconds(501.5) / 1.0)
    assert FLOOR.prefill_share(output) == pytest.approx(FLOOR.prompt_seconds(401) / 0.5)
    cached = finished(prompt=401, output=201, cached=384)   # only 17 prompt tokens were prefilled
    assert FLOOR.prefill_share(cached) == pytest.approx(FLOOR.prompt_seconds(17) / 0.5)


def test_no_share_without_the_times_it_needs():
    assert FLOOR.decode_share(finished(prompt=10, output=1)) is None        # one token: no decode step
    assert FLOOR.prefill_share(finished(prompt=10, output=5, cached=10)) is None
    unscheduled = finished(prompt=10, output=5)
    unscheduled.timings.first_scheduled = None
    assert FLOOR.prefill_share(unscheduled) is None


def test_usage_share_averages_the_choices_and_waits_for_the_floor():
    one, other = finished(prompt=401, output=201), finished(prompt=401, output=201, end=3.5)
    share = floor_share(FLOOR, [one, other])
    assert share.decode == pytest.approx((FLOOR.decode_share(one) + FLOOR.decode_share(other)) / 2)
    assert floor_share(None, [one]) is None and floor_share(FLOOR, []) is None
    assert floor_share(FLOOR, [finished(prompt=10, output=1, cached=10)]).model_dump() == {"decode": None,
                                                                                          "prefill": None}


@pytest.mark.parametrize("name, key", [("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100"),
                                       ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA GeForce RTX 4090", "rtx4090"),
                                       ("NVIDIA L4", "l4"), ("NVIDIA L40S", None), ("Tesla T4", None)])
def test_gpus_are_matched_to_their_datasheets(name, key):
    assert datasheet_for(name) == (datasheet_profiles()[key] if key else None)
