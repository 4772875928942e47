"""Several API keys; with --isolate-tenants no key sees another's cached prefixes."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from kvserve.server.config import ServerConfig

KEYS = ("sk-tenant-a", "sk-tenant-b")
PROMPT = "Paged attention stores keys and values in fixed-size blocks of tokens. " * 5


@pytest.fixture(scope="module")
def isolated(start_server):
    with start_server(api_key=KEYS, isolate_tenants=True) as s:
        yield s


def cached(server, key: str, **extra) -> int:
    r = httpx.post(f"{server.url}/v1/completions", timeout=60,
                   headers={"Authorization": f"Bearer {key}"},
                   json={"prompt": PROMPT, "max_tokens": 1, "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_a_tenant_hits_its_own_prefixes_and_never_another_s(isolated):
    a, b = KEYS
    assert cached(isolated, a) == 0
    assert cached(isolated, a) >= 48  # its own repeat hits (and is an exact repeat)
    assert cached(isolated, b) == 0  # the same prompt, another key: nothing shared
    assert cached(isolated, b) >= 48
    assert cached(isolated, a, cache_salt="team-1") == 0  # a salt of its own: a new space
    assert cached(isolated, b, cache_salt="team-1") == 0  # the same salt, another tenant
    assert cached(isolated, a, cache_salt="team-1") >= 48
    other = {"prompt": "A prompt only /generate sends, long enough for blocks. " * 4,
             "max_new_tokens": 1}
    for key, hit in ((b, False), (a, False), (a, True)):
        r = httpx.post(f"{isolated.url}/generate", headers={"Authorization": f"Bearer {key}"},
                       json=other, timeout=60)
        assert r.status_code == 200 and r.json()["prefix_cache_hit"] is hit
    isolated.wait_idle()


def test_every_key_opens_the_routes_and_the_docs(isolated):
    for path in ("/openapi.json", "/docs", "/redoc", "/v1/models"):
        assert httpx.get(isolated.url + path).status_code == 401, path
        for key in KEYS:
            r = httpx.get(isolated.url + path, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, path
    assert httpx.get(isolated.url + "/health").status_code == 200


def test_keys_from_a_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# team keys\nsk-one\n\n  sk-two  \n")
    assert ServerConfig(api_key=("sk-zero",), api_key_file=str(path)).api_key == (
        "sk-zero", "sk-one", "sk-two")
    path.write_text("# nothing here\n")
    with pytest.raises(ValueError, match="no key"):
        ServerConfig(api_key_file=str(path))


def test_isolating_tenants_needs_keys():
    with pytest.raises(ValueError, match="isolate_tenants"):
        ServerConfig(isolate_tenants=True)
    r = subprocess.run([sys.executable, "-m", "kvserve.cli", "serve", "--isolate-tenants"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "isolate_tenants" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
