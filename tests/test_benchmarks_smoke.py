"""The benchmark entry point runs end to end on toy sizes and writes valid JSON + markdown."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the benchmark scripts import their sibling modules (_timing, run) as scripts do: from their folder
sys.path.insert(0, str(ROOT / "benchmarks"))


def _load_run():
    spec = importlib.util.spec_from_file_location("qmm_benchmarks_run", ROOT / "benchmarks" / "run.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_layer_run_writes_results(tmp_path: Path) -> None:
    run = _load_run()
    # --no-alloc-tuning: leave this pytest process's malloc settings alone
    run.main(["--tiny", "--threads", "1", "--sections", "layer", "--no-alloc-tuning", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["machine"]["torch_threads"] == 1
    assert res["machine"]["allocator"].startswith("glibc defaults")
    rows = res["layer"]
    assert [(r["in"], r["out"], r["B"], r["A"]) for r in rows] == [(8, 16, 4, 1), (8, 16, 4, 2)]
    for r in rows:
        for name in ("nn.Linear", "MultiBiasLinear", "F.linear+bank[idx]", run.TWO_CALLS, "A-generator loop"):
            s = r["ms"][name]
            assert 0 < s["q1"] <= s["median"] <= s["q3"] and s["n"] >= 3
        assert r["ratio_vs_linear"]["nn.Linear"]["median"] == 1.0
    md = (tmp_path / "RESULTS.md").read_text()
    assert "| 8→16 | 4 | 2 |" in md


def test_unknown_section_is_rejected(tmp_path: Path, capsys) -> None:
    run = _load_run()
    with pytest.raises(SystemExit) as exit_info:
        run.main(["--tiny", "--sections", "nope", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "unknown sections" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_all_sections(tmp_path: Path) -> None:
    run = _load_run()
    run.main(["--tiny", "--threads", "1", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res["gan"]["ms"]) == {"WGAN", "Q-WGAN", "DMWGAN-style", "WGAN (critic w/o SN)"}
    assert 0.0 < res["gan"]["regularizer_alone_ms"]["median"]
    assert set(res["vae"]["ms"]) == {"beta-VAE", run.EM_EXAMPLE, run.EM_LOOP}
    assert "mmap threshold" in res["machine"]["allocator"]  # the examples' setting, recorded


@pytest.mark.slow
def test_allocator_benchmark_runs_pairs_of_processes(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("qmm_bench_allocator", ROOT / "benchmarks" / "bench_allocator.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--pairs", "1", "--rounds", "1", "--threads", "1", "--out", str(tmp_path)])
    assert "mmap threshold 32 MiB" in res["tuned_allocator"]
    for name, r in res["steps"].items():
        assert len(r["default_all_ms"]) == len(r["tuned_all_ms"]) == 1 and r["default_ms"] > 0, name
        assert r["ratio"]["median"] == r["tuned_ms"] / r["default_ms"]
    assert "| Q-WGAN |" in (tmp_path / "allocator.md").read_text()


def test_tiny_conv_run_writes_the_conv_table(tmp_path: Path) -> None:
    run = _load_run()
    run.main(["--tiny", "--threads", "1", "--sections", "conv", "--no-alloc-tuning", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "results.json").read_text())["conv"]
    assert [r["kind"] for r in rows] == ["ConvTranspose2d", "Conv2d"]
    for r in rows:
        for name in (f"nn.{r['kind']}", "multi-bias", "multi-bias + R_BA term"):
            s = r["ms"][name]
            assert 0 < s["q1"] <= s["median"] <= s["q3"] and s["n"] >= 3
    assert "| ConvTranspose2d 4→2, k4 s2 | 3×3 | 4 | 2 |" in (tmp_path / "RESULTS.md").read_text()


@pytest.mark.slow
def test_qbvae_separation_runs_collects_and_skips_finished_cells(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                                 ) -> None:
    import qbvae_separation as sep

    runs, results = tmp_path / "runs", tmp_path / "results"
    argv = ["--smoke", "--steps", "2", "--runs", str(runs), "--results", str(results), "--jobs", "2"]
    assert sep.main(argv) == 0
    first = capsys.readouterr().out
    for cell in sep.CELLS:
        m = json.loads((results / f"{cell}_s0.json").read_text())
        nmi = m["final"]["report"]["nmi"]
        assert f"| {cell} | 2 | {nmi:.3f} |" in first  # the table's numbers come from the copied file
        assert (results / f"{cell}_s0.png").is_file()
    stamps = {c: (runs / f"{c}_s0" / "checkpoint.pt").stat().st_mtime_ns for c in sep.CELLS}
    assert sep.main(argv) == 0  # finished cells are collected again, not retrained
    assert {c: (runs / f"{c}_s0" / "checkpoint.pt").stat().st_mtime_ns for c in sep.CELLS} == stamps
    assert json.loads((results / "kmeans_reference_s0.json").read_text())["distinct_majorities"] >= 1
