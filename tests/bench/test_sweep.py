"""`kvserve bench sweep`: the work formula, its fit, and the formula-only run."""

from __future__ import annotations

import json

import pytest

from kvserve.bench import sweep
from kvserve.model.config import ModelConfig


def test_work_formula_exact():
    p = sweep.point(5, 1000, kv_bytes_per_token=100)
    assert p == {"prompt_len": 5, "new_tokens": 1000, "cache_work": 1004,
                 "no_cache_work": 504_500, "ratio": 504_500 / 1004, "kv_bytes": 100_400}
    for prompt_len in (1, 7, 32):
        for n in (1, 2, 3, 50):
            assert sweep.no_cache_work(prompt_len, n) == sum(prompt_len + i for i in range(n))
            assert sweep.cache_work(prompt_len, n) == prompt_len + n - 1
    assert sweep.point(10_000, 1, 1)["ratio"] == 1.0  # one token: nothing to reuse yet


def test_one_two_five():
    assert sweep.one_two_five(1, 2000) == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]
    assert sweep.one_two_five(10, 64) == [10, 20, 50, 64]


def test_fit_recovers_cost_per_position_and_per_pass():
    rows = [{"work": w, "steps": s, "time_s": 2e-6 * w + 3e-3 * s}
            for w, s in ((39, 8), (312, 8), (95, 64), (4064, 64), (47, 16))]
    f = sweep.fit(rows)
    assert f["s_per_position"] == pytest.approx(2e-6) and f["s_per_step"] == pytest.approx(3e-3)
    assert f["r2"] == pytest.approx(1.0)
    assert all(r["measured_over_predicted"] == pytest.approx(1.0) for r in rows)
    rows[1]["time_s"] *= 2
    assert sweep.fit(rows)["r2"] < 0.99


def test_formula_only_run(kvserve, tmp_path, monkeypatch):
    config = ModelConfig("llama", vocab_size=10, hidden_size=8, intermediate_size=8,
                         num_layers=3, num_heads=2, num_kv_heads=1, head_dim=4,
                         max_position_embeddings=64)

    class FakeCheckpoint:
        def __init__(self, _model) -> None:
            self.config = config

    monkeypatch.setattr("kvserve.model.loader.load_checkpoint", FakeCheckpoint)
    path, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    status, out, _ = kvserve("bench", "sweep", "--prompt-len", "5", "--max-new", "1000",
                             "--measure-points", "--json", str(path), "--plot", str(png),
                             "--dtype", "bfloat16")
    assert status == 0
    r = json.loads(path.read_text())
    assert r["kv_bytes_per_token"] == 2 * 3 * 1 * 4 * 2 and r["measured"] is None
    last = r["by_new_tokens"][-1]
    assert (last["new_tokens"], last["no_cache_work"], last["cache_work"]) == (1000, 504_500, 1004)
    assert last["kv_bytes"] == 1004 * 48
    assert [p["prompt_len"] for p in r["by_prompt_len"]][::3] == [10, 100, 1000, 10_000]
    assert all(p["new_tokens"] == 100 for p in r["by_prompt_len"])
    assert "502.5x" in out
    assert png.read_bytes().startswith(b"\x89PNG")
