"""The benchmarks' interleaved timer (benchmarks/_timing.py): call counts, per-call samples, pairing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _timing  # noqa: E402
from _timing import Timing, interleaved  # noqa: E402


def _counter() -> tuple[dict[str, int], dict[str, object]]:
    calls = {"a": 0, "b": 0}

    def a() -> None:
        calls["a"] += 1

    def b() -> None:
        calls["b"] += 1

    return calls, {"a": a, "b": b}


def test_one_call_per_sample_by_default() -> None:
    calls, variants = _counter()
    t = interleaved(variants, rounds=4, warmup=2)
    assert calls == {"a": 6, "b": 6}
    assert len(t.samples["a"]) == len(t.samples["b"]) == 4


def test_min_sample_s_averages_back_to_back_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    # a fake clock: every call of `step` takes exactly 1 ms, whatever the machine is doing
    clock = {"t": 0.0, "n": 0}
    monkeypatch.setattr(_timing.time, "perf_counter", lambda: clock["t"])

    def step() -> None:
        clock["n"] += 1
        clock["t"] += 1e-3

    t = interleaved({"step": step}, rounds=3, warmup=1, min_sample_s=5e-3)
    assert clock["n"] == 1 + 3 * 5  # warm-up, then 3 samples of ceil(5 ms / 1 ms) calls
    # a sample is the mean per call, not the sum over its calls
    assert t.samples["step"] == pytest.approx([1e-3] * 3)


def test_ratio_is_paired_per_round() -> None:
    # round-wise ratios 2, 2, 2 although the medians of the two variants differ in a shifted way
    t = Timing({"x": [2.0, 4.0, 8.0], "y": [1.0, 2.0, 4.0]})
    r = t.ratio("x", "y")
    assert r["median"] == pytest.approx(2.0) and r["q1"] == pytest.approx(2.0) and r["n"] == 3
    assert t.summary("y")["median"] == pytest.approx(2000.0)  # milliseconds


def test_no_variants_is_an_error() -> None:
    with pytest.raises(ValueError, match="no variants"):
        interleaved({})


def test_median_ci_covers_the_true_median() -> None:
    """The order-statistic interval contains the true median in ~95% of samples (normal and skewed)."""
    import random

    rng = random.Random(0)
    for n, draw, true_median in [(60, lambda: rng.gauss(0, 1), 0.0), (15, lambda: rng.expovariate(1), 0.6931)]:
        hits = 0
        for _ in range(2000):
            lo, hi = _timing.median_ci([draw() for _ in range(n)])
            hits += lo <= true_median <= hi
        assert 0.93 <= hits / 2000 <= 0.995


def test_median_ci_narrows_with_more_rounds() -> None:
    small = _timing.median_ci([float(i % 10) for i in range(20)])
    big = _timing.median_ci([float(i % 10) for i in range(2000)])
    assert small[0] <= big[0] and big[1] <= small[1] and big[1] - big[0] < small[1] - small[0]


def test_progress_bar_counts_rounds(capsys: pytest.CaptureFixture[str]) -> None:
    calls, variants = _counter()
    t = interleaved(variants, rounds=7, warmup=1, progress="demo")
    assert len(t.samples["a"]) == 7 and calls == {"a": 8, "b": 8}
    assert "demo" in capsys.readouterr().err  # tqdm writes its bar to stderr
