"""Two replicas sharing one real Redis, behind the SGLang model gateway (``smg``) with its
cache-aware policy: what the gateway asks a worker is answered, and a shared-prefix
workload sent through it completes without an error."""

from __future__ import annotations

import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from redis_server import free_port, redis_server  # tests/, on the path through its conftest

SHARED = ("You answer questions about bicycle maintenance in one short sentence, naming the "
          "tool you would use. ") * 3


def test_the_load_report_has_the_gateway_shape(client):
    r = client.get("/v1/loads", params={"include": "core,disagg,queues,memory"})
    assert r.status_code == 200
    body = r.json()
    assert body["dp_rank_count"] == 1 and len(body["loads"]) == 1
    load = body["loads"][0]
    assert load["max_total_num_tokens"] == 91 * 16 and 0 <= load["token_usage"] <= 1
    assert load["num_running_reqs"] == load["num_waiting_reqs"] == 0
    assert client.get("/version").json()["version"]


@pytest.fixture
def gateway(start_server):
    smg = shutil.which("smg")
    if smg is None:
        pytest.skip("the smg gateway is not installed (make test installs it from PyPI)")
    with redis_server() as store, start_server({"kv_remote": store}) as one, \
            start_server({"kv_remote": store}) as two:
        port = free_port()
        proc = subprocess.Popen([smg, "launch", "--host", "127.0.0.1", "--port", str(port),
                                 "--worker-urls", one.url, two.url, "--policy", "cache_aware",
                                 "--log-level", "warn"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{url}/v1/models", timeout=2).json().get("data"):
                        break
                except (httpx.HTTPError, ValueError):
                    pass
                assert proc.poll() is None, "smg exited"
                assert time.monotonic() < deadline, "smg did not find its workers"
                time.sleep(0.25)
            yield url, (one, two)
        finally:
            proc.terminate()
            proc.wait(10)


def test_a_shared_prefix_workload_through_the_gateway(gateway):
    url, replicas = gateway
    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    questions = ["How do I fix a flat?", "Why does my chain skip?", "What oils a chain?",
                 "How do I true a wheel?", "Why do brakes squeal?", "When is a chain worn?",
                 "How tight is a stem bolt?", "How do I adjust a derailleur?"]

    def ask(question: str) -> httpx.Response:
        return httpx.post(f"{url}/v1/completions", timeout=120, json={
            "model": model, "prompt": SHARED + question, "max_tokens": 8, "temperature": 0,
            "ignore_eos": True})

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, questions))
    assert [a.status_code for a in answers] == [200] * len(questions)
    assert [a.json()["usage"]["completion_tokens"] for a in answers] == [8] * len(questions)
    cached = sum(a.json()["usage"]["prompt_tokens_details"]["cached_tokens"] for a in answers)
    assert cached > 0  # the shared prefix was computed once per replica at most
    for replica in replicas:
        replica.wait_idle()
