"""The playground's pure JavaScript (server-sent events, Prometheus text, an answer's numbers),
run with Node where it is installed; the page itself is driven by the browser tests."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

STATIC = Path(__file__).parent.parent / "hayate" / "server" / "static"
NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")


def run_js(body: str) -> object:
    """Run an ES module that imports the page's modules and prints JSON; return what it printed."""
    script = (f'import * as api from "{(STATIC / "api.js").as_uri()}";\n'
              f'import * as stats from "{(STATIC / "stats.js").as_uri()}";\n{body}')
    done = subprocess.run([NODE, "--input-type=module", "-e", script], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_events_are_split_at_blank_lines_and_the_rest_kept():
    split = run_js('console.log(JSON.stringify(api.splitEvents('
                   '"data: {\\"a\\": 1}\\n\\ndata: [DONE]\\n\\r\\n: comment\\n\\ndata: {\\"b\\"")));')
    assert split == {"events": ['{"a": 1}', "[DONE]"], "rest": 'data: {"b"'}


def test_metrics_text_is_read_by_name():
    text = ("# HELP hayate_num_running_requests Requests.\\n# TYPE hayate_num_running_requests gauge\\n"
            "hayate_num_running_requests 3.0\\nhayate_requests_total{finish_reason=\\\"stop\\\"} 9.0\\n"
            "hayate_kv_cache_usage_ratio 0.25\\n")
    values = run_js(f'console.log(JSON.stringify(stats.parseMetrics("{text}")));')
    assert values == {"hayate_num_running_requests": 3, "hayate_kv_cache_usage_ratio": 0.25}


def test_an_answers_numbers_include_the_servers_timings_and_the_floor():
    usage = {"prompt_tokens": 40, "completion_tokens": 11, "prompt_tokens_details": {"cached_tokens": 32},
             "queue_time": 0.002, "prompt_time": 0.05, "completion_time": 0.5,
             "floor_share": {"decode": 0.4321, "prefill": None}}
    rows = run_js('console.log(JSON.stringify(stats.answerStats('
                  f'{{sent: 0, first: 100, last: 600}}, {json.dumps(usage)})));')
    stats = {key: text for key, _, text in rows}
    assert stats["ttft"] == "100 ms" and stats["tokens-per-second"] == "20.0"
    assert stats["cached"] == "32 prompt tokens" and stats["queue-time"] == "2.0 ms"
    assert stats["floor-decode"] == "43% of floor" and "floor-prefill" not in stats


def test_a_stopped_answer_still_has_its_first_token_time():
    rows = run_js('console.log(JSON.stringify(stats.answerStats({sent: 0, first: 250, last: 250}, null)));')
    assert rows == [["ttft", "time to first token", "250 ms"]]
