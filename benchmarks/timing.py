"""Interleaved timing for ratio gates: both sides of a ratio see the same machine drift."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Timing:
    """Seconds per call over the measured rounds: wall-clock quartiles, and the median CPU
    seconds the whole process used (every thread's), which other processes' load barely moves."""

    median: float
    q1: float
    q3: float
    rounds: int
    cpu_median: float


def interleaved(
    candidates: Mapping[str, Callable[[], object]], *, rounds: int = 30, warmup: int = 3
) -> dict[str, Timing]:
    """Time each callable ``rounds`` times, round-robin, after ``warmup`` untimed calls each.

    Round-robin order means a slow spell on a shared machine lands on every candidate alike,
    so ratios of the medians stay meaningful where absolute times do not.
    """
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    cpu: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            samples[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {
        name: Timing(
            median=float(np.median(values)),
            q1=float(np.percentile(values, 25)),
            q3=float(np.percentile(values, 75)),
            rounds=rounds,
            cpu_median=float(np.median(cpu[name])),
        )
        for name, values in samples.items()
    }
