"""Interleaved timing: every variant runs once per round (round-robin), so slow drift of a shared,
noisy machine hits all variants alike; ratios are taken per round (paired) and summarised by
their median and inter-quartile range."""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    """Per-variant seconds of every round (one call each)."""

    samples: dict[str, list[float]]

    def summary(self, name: str) -> dict[str, float]:
        """Median and quartiles in milliseconds."""
        return _quartiles([t * 1e3 for t in self.samples[name]])

    def ratio(self, name: str, baseline: str) -> dict[str, float]:
        """Paired per-round ratio ``name / baseline``: median and quartiles."""
        return _quartiles([a / b for a, b in zip(self.samples[name], self.samples[baseline])])


def median_ci(values: list[float], z: float = 1.96) -> tuple[float, float]:
    """Distribution-free ~95% confidence interval of the median: the order statistics of rank
    ``n/2 -+ z*sqrt(n)/2`` (normal approximation to the binomial count of values below the
    median). The quartiles describe the spread of single rounds; this interval is how well the
    median itself is known, and it narrows as ``1/sqrt(n)`` with more rounds."""
    v = sorted(values)
    n = len(v)
    half = z * math.sqrt(n) / 2
    lo = max(0, math.floor(n / 2 - half) - 1)  # 1-based rank floor(n/2 - half), as a 0-based index
    hi = min(n - 1, math.ceil(n / 2 + half))  # 1-based rank ceil(n/2 + half) + 1
    return v[lo], v[hi]


def _quartiles(values: list[float]) -> dict[str, float]:
    if len(values) < 2:
        v = values[0]
        return {"median": v, "q1": v, "q3": v, "ci_lo": v, "ci_hi": v, "n": len(values)}
    q1, med, q3 = statistics.quantiles(values, n=4, method="inclusive")
    lo, hi = median_ci(values)
    return {"median": med, "q1": q1, "q3": q3, "ci_lo": lo, "ci_hi": hi, "n": len(values)}


def interleaved(variants: Mapping[str, Callable[[], object]], *, rounds: int | None = None,
                warmup: int = 2, budget_s: float = 3.0, min_rounds: int = 5, max_rounds: int = 25,
                min_sample_s: float = 0.0, progress: str | None = None) -> Timing:
    """Time ``variants`` round-robin.

    After ``warmup`` untimed rounds, the number of rounds is ``rounds`` if given, else as many as
    fit ``budget_s`` (estimated from the warm-up), clamped to ``[min_rounds, max_rounds]``.

    ``min_sample_s``: a sample is the mean of ``n`` back-to-back calls, ``n`` chosen per variant
    from the warm-up so that a sample lasts at least this long. Sub-millisecond calls timed one
    at a time mostly measure the scheduler of a shared machine; averaging a few milliseconds of
    calls per sample keeps the per-round pairing (the ratio) while removing that jitter.

    ``progress``: a label for a tqdm bar over the rounds (on stderr; for the long step sets).
    """
    if not variants:
        raise ValueError("interleaved: no variants to time")
    single = {k: 0.0 for k in variants}
    for _ in range(max(warmup, 1)):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            single[name] = time.perf_counter() - t0
    inner = {k: max(1, math.ceil(min_sample_s / max(t, 1e-9))) for k, t in single.items()}
    if rounds is None:
        per_round = sum(inner[k] * single[k] for k in variants)
        rounds = int(budget_s / max(per_round, 1e-9))
        rounds = max(min_rounds, min(max_rounds, rounds))
    samples: dict[str, list[float]] = {k: [] for k in variants}
    order = range(rounds)
    if progress is not None:
        from tqdm.auto import tqdm

        order = tqdm(order, desc=progress, unit="round", leave=False)
    for r in order:
        # rotate the starting variant so no variant always runs right after the same neighbour
        items = list(variants.items())
        items = items[r % len(items):] + items[:r % len(items)]
        for name, fn in items:
            n = inner[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - t0) / n)
    return Timing(samples)


def machine() -> dict[str, object]:
    """Description of the machine and software the numbers were measured on."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=False).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "git_commit": commit,
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
