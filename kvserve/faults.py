"""Faults injected on purpose, for tests: make one request fail at one stage of a step.

Stages: ``schedule``, ``load`` (a tier block copied in), ``runner`` (its inputs and the
forward pass), ``grammar`` (a constrained request's token mask), ``sample`` and
``detokenize``. Nothing is armed outside tests, and an
unarmed check costs one truth test.
"""

from __future__ import annotations

STAGES = ("schedule", "load", "runner", "grammar", "sample", "detokenize")
_armed: set[tuple[str, str]] = set()


class InjectedFault(RuntimeError):
    pass


def arm(stage: str, request_id: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
    _armed.add((stage, request_id))


def disarm_all() -> None:
    _armed.clear()


def check(stage: str, request_id: str) -> None:
    if _armed and (stage, request_id) in _armed:
        raise InjectedFault(f"injected fault at {stage} for {request_id}")
