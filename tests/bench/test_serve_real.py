"""The slow one: `bench serve` against a real `kvserve serve` process on the default model."""

from __future__ import annotations

import json
import sys

import pytest

from kvserve.bench.compare import free_port, local_server


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_bench_serve_against_kvserve_serve(kvserve, tmp_path):
    port = free_port()
    command = [sys.executable, "-m", "kvserve.cli", "serve", "--port", str(port), "--device",
               "cpu", "--kv-cache-memory", "64MiB"]
    path = tmp_path / "serve.json"
    with local_server(command, f"http://127.0.0.1:{port}", timeout_s=90) as url:
        status, _, err = kvserve("bench", "serve", "--base-url", url, "--num-requests", "4",
                                 "--unique-prompts", "2", "--concurrency", "1", "--max-tokens",
                                 "8", "--extra-body", '{"ignore_eos": true}', "--json", str(path))
    assert status == 0, err
    r = json.loads(path.read_text())
    assert r["errors"] == 0 and r["model"].startswith("SmolLM2-135M-Instruct")
    assert r["output_tokens_per_s"] * r["duration_s"] == pytest.approx(4 * 8)
    # One request at a time: requests 3 and 4 repeat 1 and 2, whose blocks stayed cached.
    assert r["cached_tokens_total"] > 0
    assert 0 < r["ttft_ms"]["p50"] < r["latency_ms"]["p50"]
    assert r["itl_ms"]["mean"] > 0 and r["tpot_ms"]["mean"] > 0
