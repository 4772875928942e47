"""`kvserve bench compare`: configurations, speedups, and the server it starts and stops."""

from __future__ import annotations

import json
import sys

import httpx
import pytest

from kvserve.bench import compare
from kvserve.bench.client import BenchError
from kvserve.cli import build_parser

HEALTH_SERVER = """
import http.server, sys
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


def test_compare_measures_each_configuration(fake_server, kvserve, tmp_path, monkeypatch):
    def no_server(*_):
        raise AssertionError("every configuration has a --base-url: no server to start")

    monkeypatch.setattr(compare, "our_server", no_server)
    path = tmp_path / "compare.json"
    with fake_server(gap_s=0.0, no_kv_gap_s=0.05) as server:
        urls = [a for flag in ("kv-prefix", "kv", "no-kv")
                for a in (f"--base-url-{flag}", server.url)]
        status, out, _ = kvserve("bench", "compare", *urls, "--num-requests", "4",
                                 "--concurrency", "2", "--json", str(path))
    assert status == 0
    r = json.loads(path.read_text())
    assert list(r["configs"]) == ["kv_prefix", "kv", "no_kv"]
    assert set(r["speedups"]) == {"kv_prefix", "kv"}
    assert all(c["result"]["errors"] == 0 and c["result"]["num_requests"] == 4
               for c in r["configs"].values())
    assert r["speedups"]["kv"]["latency_ms.mean"] > 1  # the baseline's chunks come slower
    assert r["speedups"]["kv"]["output_tokens_per_s"] > 1
    assert r["env"]["date"] and r["configs"]["no_kv"]["request_fields"] == {
        "use_kv_cache": False, "use_prefix_cache": False}
    fields = [(b.get("use_kv_cache"), b.get("use_prefix_cache")) for b in server.bodies]
    assert fields == [(None, None)] * 8 + [(False, False)] * 4
    assert "no KV cache" in out and "avg decode" in out


def test_engine_options_become_server_flags():
    parse = build_parser().parse_args
    assert compare.engine_flags(parse(["bench", "compare"])) == []
    args = parse(["bench", "compare", "--dtype", "bfloat16", "--kv-cache-memory", "64MiB",
                  "--max-num-seqs", "8", "--no-prefix-cache", "--threads", "2"])
    assert compare.engine_flags(args) == ["--dtype", "bfloat16", "--kv-cache-memory",
                                          str(64 << 20), "--max-num-seqs", "8", "--threads", "2"]


@pytest.mark.parametrize("interrupt", [RuntimeError, KeyboardInterrupt])
def test_the_server_is_stopped_however_the_run_ends(interrupt):
    port = compare.free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-c", HEALTH_SERVER, str(port)]
    with pytest.raises(interrupt), compare.local_server(command, url, timeout_s=30):
        assert httpx.get(f"{url}/health").status_code == 200
        raise interrupt
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health")


def test_a_server_that_exits_is_a_clear_error():
    command = [sys.executable, "-c", "print('kvserve: error: no such model'); exit(2)"]
    with pytest.raises(BenchError, match="exited with status 2: kvserve: error: no such model"):
        with compare.local_server(command, f"http://127.0.0.1:{compare.free_port()}", 30):
            pass
