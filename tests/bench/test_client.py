"""The load client's pieces without a server: statistics, arrivals, request bodies, workload."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from kvserve.bench.client import (
    LoadSpec,
    RequestResult,
    arrival_offsets,
    chunk_text,
    percentile,
    request_body,
    stats_ms,
)
from kvserve.bench.serve import DEFAULT_PROMPTS, add_args, workload


def test_stats_on_known_latencies():
    stats = stats_ms([k / 1000 for k in range(100, 0, -1)])  # 100 ms ... 1 ms, unsorted
    assert stats == pytest.approx({"mean": 50.5, "p50": 50.5, "p95": 95.05, "p99": 99.01})
    assert stats_ms([0.010, 0.040, 0.020, 0.030]) == pytest.approx(
        {"mean": 25.0, "p50": 25.0, "p95": 38.5, "p99": 39.7})


def test_percentile_edges():
    assert percentile([7.0], 99) == 7.0
    assert percentile([1.0, 2.0], 0) == 1.0
    assert percentile([1.0, 2.0], 100) == 2.0
    assert stats_ms([]) == {"mean": None, "p50": None, "p95": None, "p99": None}


def test_arrivals_all_at_once_or_poisson():
    assert arrival_offsets(4, math.inf, seed=0) == [0.0] * 4
    offsets = arrival_offsets(4000, 10.0, seed=1)
    assert offsets[0] == 0.0 and offsets == sorted(offsets)
    gaps = [b - a for a, b in zip(offsets, offsets[1:])]
    assert sum(gaps) / len(gaps) == pytest.approx(0.1, rel=0.05)  # exponential, mean 1/rate
    assert offsets == arrival_offsets(4000, 10.0, seed=1)


def test_request_bodies_are_standard_unless_told():
    spec = LoadSpec("http://h/v1", ("q",), max_tokens=9)
    chat = request_body(spec, "m", "q")
    assert chat == {"model": "m", "max_tokens": 9, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True},
                    "messages": [{"role": "user", "content": "q"}]}
    spec = LoadSpec("http://h", ("q",), endpoint="completions",
                    extra_body={"repeat_penalty": 1.0, "temperature": 0.5})
    completion = request_body(spec, "m", "q")
    assert completion["prompt"] == "q" and "messages" not in completion
    assert completion["repeat_penalty"] == 1.0 and completion["temperature"] == 0.5
    assert spec.root == LoadSpec("http://h/v1/", ()).root == "http://h"


def test_chunk_text():
    assert chunk_text({"choices": [{"delta": {"role": "assistant"}}]}, "chat") == ""
    assert chunk_text({"choices": [{"delta": {"content": "hi"}}]}, "chat") == "hi"
    assert chunk_text({"choices": [{"text": "yo"}]}, "completions") == "yo"
    assert chunk_text({"choices": [], "usage": {}}, "completions") == ""


def test_token_counts_prefer_usage():
    r = RequestResult(ttft_s=0.1, e2e_s=0.7, num_chunks=3)
    assert r.output_tokens == 3 and r.tpot_s == pytest.approx(0.3)
    r.completion_tokens = 7
    assert r.output_tokens == 7 and r.tpot_s == pytest.approx(0.1)
    assert RequestResult(ttft_s=0.1, e2e_s=0.2, num_chunks=1).tpot_s is None


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_args(p)
    return p.parse_args(["--base-url", "http://h", *argv])


def test_workload_cycles_the_chosen_prompts(tmp_path):
    a, b = DEFAULT_PROMPTS[:2]
    assert workload(parse("--num-requests", "7", "--unique-prompts", "2")) == (a, b) * 3 + (a,)
    assert workload(parse("--num-requests", "5")) == DEFAULT_PROMPTS
    lines = tmp_path / "p.txt"
    lines.write_text("first prompt\n\nsecond prompt\n")
    assert workload(parse("--prompts", str(lines), "--num-requests", "3")) == (
        "first prompt", "second prompt", "first prompt")
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps({"prompt": p, "id": i}) for i, p in enumerate("ab")))
    assert workload(parse("--prompts", str(jsonl), "--num-requests", "2")) == ("a", "b")


@pytest.mark.parametrize("option, value", [("--unique-prompts", "0"), ("--num-requests", "0"),
                                           ("--concurrency", "0"), ("--request-rate", "0")])
def test_bad_workload_values(kvserve, option, value):
    status, _, err = kvserve("bench", "serve", "--base-url", "http://127.0.0.1:1", option, value)
    assert status == 2 and option in err


def test_bad_extra_body_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        parse("--extra-body", "[1]")
    assert "must be a JSON object" in capsys.readouterr().err
