"""The command line explains itself and refuses bad values with one line and exit code 2."""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys

import pytest

from kvserve import __version__
from kvserve.cli import build_parser


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, (*path, name))


def test_every_option_of_every_command_has_help_text():
    missing = [f"{' '.join(path) or 'kvserve'} {a.option_strings or a.dest}"
               for path, parser in commands(build_parser()) for a in parser._actions
               if not a.help and not isinstance(a, argparse._SubParsersAction)]
    assert missing == []


def test_options_with_a_default_show_it():
    parser = dict(commands(build_parser()))[("serve",)]
    text = parser.format_help()
    for shown in ("--dtype {float32,bfloat16,float16}", "(default: float32)",
                  "(default: 1.0GiB)", "(default: 16)", "(default: 8000)",
                  "(default: 127.0.0.1)", "(default: 2048)", "(default: 64)"):
        assert shown in " ".join(text.split()), shown


def test_top_level_help_says_what_kvserve_is_and_what_to_run_first(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "built around the KV cache" in out and "parse, call, print" not in out
    assert 'kvserve generate "' in out and "kvserve serve" in out and "kvserve bench kv" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"kvserve {__version__}"


BAD = [
    (["serve", "--port", "99999"], "--port"),
    (["serve", "--port", "0"], "--port"),
    (["serve", "--port", "http"], "--port"),
    (["serve", "--kv-cache-memory", "0"], "--kv-cache-memory"),
    (["serve", "--kv-cache-memory", "-5GiB"], "--kv-cache-memory"),
    (["serve", "--kv-cache-memory", "512MiBs"], "--kv-cache-memory"),
    (["serve", "--kv-disk-size", "12 parsecs"], "--kv-disk-size"),
    (["serve", "--block-size", "0"], "--block-size"),
    (["serve", "--block-size", "4096"], "block_size"),
    (["serve", "--max-num-seqs", "-1"], "--max-num-seqs"),
    (["serve", "--max-num-batched-tokens", "0"], "--max-num-batched-tokens"),
    (["serve", "--max-model-len", "0"], "--max-model-len"),
    (["serve", "--threads", "0"], "--threads"),
    (["serve", "--dtype", "float64"], "--dtype"),
    (["serve", "--max-waiting", "0"], "--max-waiting"),
    (["serve", "--kv-disk-cache", "/proc/kvserve-cache"], "--kv-disk-cache"),
    (["generate", "hi", "--max-tokens", "0"], "--max-tokens"),
    (["bench", "kv", "--schedule-policy", "random"], "--schedule-policy"),
]


@pytest.mark.parametrize("argv,option", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_values_end_with_one_line_naming_the_option(argv, option):
    # A real process: exit code, stderr and speed are what a user sees.
    r = subprocess.run([sys.executable, "-m", "kvserve.cli", *argv], capture_output=True,
                       text=True, timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and option in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert r.stdout == ""


def test_the_plotting_library_comes_with_the_base_install():
    requires = importlib.metadata.requires("kvserve") or []
    base = [r for r in requires if "extra ==" not in r]
    assert any(r.startswith("matplotlib") for r in base), base
