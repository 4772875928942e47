"""`kvserve bench report`: Markdown from sample results, hand-written text kept."""

from __future__ import annotations

import json

import pytest

from kvserve.bench import report

ENV = {"machine": "x86_64", "cpu_count": 2, "model": "SmolLM2-135M-Instruct (default)",
       "dtype": "float32", "commit": "abc1234", "date": "2026-01-02"}
STATS = {"mean": 10.0, "p50": 9.0, "p95": 19.0, "p99": 20.0}
SERVE = {"base_url": "http://127.0.0.1:8000", "model": "m", "num_requests": 20, "concurrency": 4,
         "max_tokens": 50, "errors": 0, "duration_s": 3.0, "requests_per_s": 6.5,
         "output_tokens_per_s": 321.0, "latency_ms": STATS, "ttft_ms": STATS, "tpot_ms": STATS,
         "itl_ms": STATS, "decode_ms": {"mean": 8.0}, "cached_tokens_total": 640}
SAMPLES = {
    "kv.json": {"prompt_tokens": 40, "new_tokens": 50, "speedup": 3.25, "identical_tokens": True,
                "kv_cache": {"total_s": 1.5, "kv_work": 89},
                "no_cache": {"total_s": 4.875, "kv_work": 3225}, "env": ENV},
    "decode-f32.json": {"dtype": "float32", "bandwidth_gb_s": 27.7,
                        "kvserve": {"decode_tokens_per_s": 33.67}, "transformers": None,
                        "env": ENV},
    "throughput.json": {"num_prompts": 8, "batched": {"elapsed_s": 2.0},
                        "sequential": {"elapsed_s": 9.0}},
    "prefix.json": {"prefix_len": 512, "on": {"ttft_warm_p50_s": 0.01},
                    "off": {"ttft_p50_s": 0.2}},
    "serve.json": SERVE,
    "compare.json": {"num_requests": 20, "command": "kvserve bench compare --max-tokens 50",
                     "configs": {"kv_prefix": {"label": "KV + prefix", "result": SERVE},
                                 "no_kv": {"label": "no KV cache", "result": SERVE}},
                     "speedups": {"kv_prefix": {"latency_ms.p95": 4.5}}, "env": ENV},
    "sweep.json": {"prompt_len": 5, "by_new_tokens": [
        {"prompt_len": 5, "new_tokens": 1000, "cache_work": 1004, "no_cache_work": 504500,
         "ratio": 502.49, "kv_bytes": 46264320}], "by_prompt_len": [], "measured": None},
    "notes.json": {"anything": 1},
}


@pytest.fixture
def results(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    for name, result in SAMPLES.items():
        (folder / name).write_text(json.dumps(result))
    (folder / "broken.json").write_text("{not json")
    for png in ("serve.png", "sweep-curves.png", "kv-long.png", "orphan.png"):
        (folder / png).write_bytes(b"\x89PNG")
    return folder


def test_kinds_are_told_by_keys():
    kinds = {name: report.kind_of(result) for name, result in SAMPLES.items()}
    assert kinds == {"kv.json": "kv", "decode-f32.json": "decode", "throughput.json": "throughput",
                     "prefix.json": "prefix", "serve.json": "serve", "compare.json": "compare",
                     "sweep.json": "sweep", "notes.json": None}


def test_report_from_sample_results(results, tmp_path, kvserve):
    out = tmp_path / "docs" / "BENCHMARKS.md"
    status, _, _ = kvserve("bench", "report", "--results", str(results), "--out", str(out))
    assert status == 0
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\n" + report.BEGIN)
    for name in SAMPLES.keys() - {"notes.json"}:
        assert f"### {name} ({report.kind_of(SAMPLES[name])})" in text
    assert "Not recognised as a benchmark result: broken.json, notes.json." in text
    assert "Measured: date 2026-01-02, machine x86_64, cpu_count 2" in text
    assert "`kvserve bench compare --max-tokens 50`" in text
    assert "| latency_ms | 10 | 9 | 19 | 20 |" in text  # serve's stats table
    assert "| latency_ms.p95 | 19 | 19 | 4.5 |" in text  # compare: configs side by side, speedup
    assert "| 5 | 1,000 | 1,004 | 504,500 | 502.5 | 46,264,320 |" in text
    assert "| kv_work | 89 | 3,225 |" in text and "speedup 3.25" in text
    assert "![serve.png](serve.png)" in text  # copied beside the report
    assert (out.parent / "serve.png").read_bytes() == b"\x89PNG"
    assert text.index("sweep-curves.png") > text.index("### sweep.json")
    assert text.index("kv-long.png") > text.index("### kv.json")
    assert text.index("orphan.png") > text.index("### Other plots")


def test_hand_written_sections_are_kept(results, tmp_path, kvserve):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nWritten by hand.\n")
    kvserve("bench", "report", "--results", str(results), "--out", str(out))
    first = out.read_text()
    assert first.startswith("# Benchmarks\n\nWritten by hand.\n\n" + report.BEGIN)
    assert first.endswith(report.END + "\n")
    out.write_text(first + "\n## Notes\n\nAlso by hand.\n")
    (results / "serve.json").unlink()
    kvserve("bench", "report", "--results", str(results), "--out", str(out))
    second = out.read_text()
    assert second.count(report.BEGIN) == second.count(report.END) == 1
    assert "### serve.json" not in second and "### kv.json" in second
    assert second.startswith("# Benchmarks\n\nWritten by hand.\n\n" + report.BEGIN)
    assert second.endswith(report.END + "\n\n## Notes\n\nAlso by hand.\n")


def test_missing_results_folder(tmp_path, kvserve):
    status, _, err = kvserve("bench", "report", "--results", str(tmp_path / "none"),
                             "--out", str(tmp_path / "B.md"))
    assert status == 2 and "no results folder" in err


def test_throughput_vs_concurrency_table_and_plot(tmp_path, kvserve):
    folder = tmp_path / "results"
    folder.mkdir()
    for c, tps in ((1, 36.6), (4, 71.7), (16, 175.1)):
        run = {**SERVE, "concurrency": c, "output_tokens_per_s": tps}
        (folder / f"serve-c{c}.json").write_text(json.dumps(run))
    out = tmp_path / "docs" / "B.md"
    kvserve("bench", "report", "--results", str(folder), "--out", str(out))
    text = out.read_text()
    assert "### Throughput vs concurrency (m, 20 requests x 50 tokens)" in text
    assert "| 1 | 6.5 | 36.6 | 9 | 9 |" in text and "| 16 | 6.5 | 175.1 | 9 | 9 |" in text
    [png] = out.parent.glob("serve-concurrency*.png")
    assert png.read_bytes().startswith(b"\x89PNG") and f"]({png.name})" in text
