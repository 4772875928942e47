"""`kvserve bench serve` against a fake OpenAI-compatible server."""

from __future__ import annotations

import json

import pytest

from kvserve.bench.client import arrival_offsets
from kvserve.bench.compare import free_port
from kvserve.bench.serve import DEFAULT_PROMPTS

KEYS = {"base_url", "model", "num_requests", "concurrency", "max_tokens", "errors", "duration_s",
        "requests_per_s", "output_tokens_per_s", "latency_ms", "ttft_ms", "tpot_ms", "itl_ms",
        "decode_ms", "cached_tokens_total"}
STATS = {"mean", "p50", "p95", "p99"}


def bench(kvserve, url: str, tmp_path, *argv: str) -> tuple[int, str, str, dict | None]:
    path = tmp_path / "serve.json"
    status, out, err = kvserve("bench", "serve", "--base-url", url, "--json", str(path), *argv)
    return status, out, err, json.loads(path.read_text()) if path.exists() else None


def test_streams_with_usage(fake_server, kvserve, tmp_path):
    with fake_server(first_delay_s=0.1, gap_s=0.05) as server:
        status, out, _, r = bench(kvserve, server.url + "/v1", tmp_path, "--num-requests", "6",
                                  "--unique-prompts", "2", "--concurrency", "2",
                                  "--max-tokens", "9")
    assert status == 0
    assert set(r) == KEYS
    assert all(set(r[k]) == STATS for k in ("latency_ms", "ttft_ms", "tpot_ms", "itl_ms"))
    assert set(r["decode_ms"]) == {"mean"}
    assert (r["model"], r["num_requests"], r["concurrency"], r["max_tokens"], r["errors"]) == (
        "fake-model", 6, 2, 9, 0)
    assert r["output_tokens_per_s"] * r["duration_s"] == pytest.approx(6 * 7)  # usage's count
    assert r["requests_per_s"] * r["duration_s"] == pytest.approx(6)
    assert r["cached_tokens_total"] == 6 * 3
    assert r["ttft_ms"]["p50"] >= 100 and r["itl_ms"]["p50"] >= 50
    assert r["latency_ms"]["mean"] == pytest.approx(r["ttft_ms"]["mean"] + r["decode_ms"]["mean"])
    assert r["tpot_ms"]["mean"] == pytest.approx(r["decode_ms"]["mean"] / (7 - 1))
    assert server.max_in_flight == 2
    body = server.bodies[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["temperature"] == 0 and body["max_tokens"] == 9 and body["model"] == "fake-model"
    sent = [b["messages"][0]["content"] for b in server.bodies]
    assert sorted(sent) == sorted(list(DEFAULT_PROMPTS[:2]) * 3)
    assert "end-to-end latency" in out


def test_counts_chunks_without_usage(fake_server, kvserve, tmp_path):
    with fake_server(usage=False) as server:
        status, _, _, r = bench(kvserve, server.url, tmp_path, "--num-requests", "4",
                                "--endpoint", "completions", "--extra-body",
                                '{"repeat_penalty": 1.0}')
    assert status == 0
    assert r["output_tokens_per_s"] * r["duration_s"] == pytest.approx(4 * 3)
    assert r["cached_tokens_total"] is None
    assert all(b["prompt"] in DEFAULT_PROMPTS and b["repeat_penalty"] == 1.0
               for b in server.bodies)


@pytest.mark.parametrize("status_code", [500, 400])
def test_failed_requests_are_counted_and_reported(fake_server, kvserve, tmp_path, status_code):
    with fake_server(fail_every=2, status=status_code) as server:
        status, _, err, r = bench(kvserve, server.url, tmp_path, "--num-requests", "6")
    assert status == 2
    assert r["errors"] == 3
    assert r["output_tokens_per_s"] * r["duration_s"] == pytest.approx(3 * 7)
    assert f"3 of 6 requests failed; first error: HTTP {status_code}" in err
    assert "boom 0" in err and "Traceback" not in err


def test_error_event_in_the_stream_fails_the_request(fake_server, kvserve, tmp_path):
    with fake_server(fail_every=1, error_in_stream=True) as server:
        status, _, err, r = bench(kvserve, server.url, tmp_path, "--num-requests", "2")
    assert status == 2 and r is None  # nothing succeeded: no table, no JSON
    assert "2 of 2 requests failed" in err and "engine fell over" in err


def test_server_down(kvserve, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    status, _, err, r = bench(kvserve, url, tmp_path)
    assert status == 2 and r is None
    assert err.startswith(f"kvserve: error: cannot reach {url}") and err.count("\n") == 1


def test_wrong_model_name(fake_server, kvserve, tmp_path):
    with fake_server() as server:
        status, _, err, _ = bench(kvserve, server.url, tmp_path, "--model", "nope")
    assert status == 2 and not server.bodies
    assert "'nope' is not served" in err and "fake-model" in err


def test_poisson_arrivals_spread_the_requests(fake_server, kvserve, tmp_path):
    with fake_server() as server:
        status, _, _, r = bench(kvserve, server.url, tmp_path, "--num-requests", "5",
                                "--request-rate", "20", "--seed", "3")
    assert status == 0
    assert r["duration_s"] >= arrival_offsets(5, 20.0, seed=3)[-1] > 0.05


def test_plot(fake_server, kvserve, tmp_path):
    pytest.importorskip("matplotlib")
    with fake_server() as server:
        status, _, _, _ = bench(kvserve, server.url, tmp_path, "--num-requests", "3",
                                "--plot", str(tmp_path / "serve.png"))
    assert status == 0
    assert (tmp_path / "serve.png").read_bytes().startswith(b"\x89PNG")
