"""benchmarks/time_to_quality.py: the first report at the NMI threshold, the page from results alone,
and (slow) a smoke run of the four contenders that resumes, skips finished runs and rewrites the page."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "time_to_quality.py"
LABELS = {"qwgan": "Q-WGAN", "qwgan-raw": "Q-WGAN, G itself", "dmwgan": "DMWGAN-style", "infogan": "InfoGAN"}


def _load() -> ModuleType:
    # the script imports its sibling benchmarks/_timing.py as scripts do: from its folder
    if str(SCRIPT.parent) not in sys.path:
        sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("qmm_time_to_quality", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # the dataclass needs its module registered
    spec.loader.exec_module(mod)
    return mod


def _row(step: int, sec_per_step: float, nmi: float | None) -> dict[str, float | int]:
    row: dict[str, float | int] = {"step": step, "loss_d": 1.0, "sec_per_step": sec_per_step}
    if nmi is not None:
        row.update({"report/nmi": nmi, "report/distinct_majorities": 5, "report/confident": 0.5})
    return row


def test_first_report_at_the_threshold_not_the_best() -> None:
    ttq = _load()
    rows = [_row(600, 0.5, 0.7), _row(190, 0.4, None), _row(200, 0.5, 0.3), _row(400, 0.25, 0.6),
            _row(410, 0.25, None), _row(800, 0.5, 0.7)]
    points = ttq.report_points(rows)
    assert [p["step"] for p in points] == [200, 400, 600, 800]  # rows without a report left out, in order
    assert [p["seconds"] for p in points] == [100.0, 100.0, 300.0, 400.0]  # sec_per_step x step
    hit = ttq.first_reaching(points, 0.6)
    assert hit is not None and (hit["step"], hit["seconds"], hit["nmi"]) == (400, 100.0, 0.6)  # >= counts
    assert ttq.first_reaching(points, 0.65)["step"] == 600
    assert ttq.first_reaching(points, 0.71) is None
    assert ttq.first_reaching([], 0.6) is None
    assert ttq.best_point(points)["step"] == 600  # the earliest of the equal best
    assert ttq.best_point([]) is None


def test_page_from_results_alone(tmp_path: Path) -> None:
    ttq = _load()
    pts = [{"step": s, "seconds": 2.0 * s, "nmi": v, "distinct": d, "confident": 0.5}
           for s, v, d in ((100, 0.3, 4), (200, 0.65, 8), (300, 0.62, 9))]
    low = [{**p, "nmi": p["nmi"] / 2} for p in pts]
    inv = [{"argv": [sys.executable, str(SCRIPT), "--steps", "300"], "exit": 0, "wall_s": 700.0,
            "loadavg_at_start": [1.5, 1.0, 1.0], "loadavg_at_end": [2.0, 1.0, 1.0]}]

    def model(label: str, points: list[dict]) -> dict:
        return {"label": label, "what": "x", "settings": {"beta1": 0.5}, "steps": 300, "finished": True,
                "invocations": inv, "processes": 1, "process_wall_s": 700.0, "points": points,
                "reached": None, "best": ttq.best_point(points), "end": points[-1]}

    results = {"threshold": 0.6, "commands": ["python benchmarks/time_to_quality.py --steps 300"],
               "machine": {"logical_cpus": 2, "cpu": "test cpu"}, "omp_num_threads": "1",
               "models": {"qwgan": model("Q-WGAN", pts), "dmwgan": model("DMWGAN-style", low)}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert ttq.main(["--report", "--out", str(tmp_path)]) == 0
    page = (tmp_path / "TIME_TO_QUALITY.md").read_text()
    assert "| Q-WGAN (`qwgan`) | x; beta1 0.5 | 300 | 400 s (step 200) | 0.620 / 9 / 0.50 | 600 | 700 |" in page
    assert "not reached (best 0.325 at 400 s, step 200)" in page
    assert "`python benchmarks/time_to_quality.py --steps 300`" in page and "2-core CPU" in page
    assert (tmp_path / "nmi_vs_seconds.png").stat().st_size > 1000
    assert ttq.main(["--report", "--threshold", "0.3", "--out", str(tmp_path)]) == 0  # threshold recomputed
    again = json.loads((tmp_path / "results.json").read_text())
    assert again["threshold"] == 0.3 and again["models"]["dmwgan"]["reached"]["step"] == 200


def test_bad_input_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ttq = _load()
    for argv, message in ((["--models", "gan"], "choose from 'qwgan', 'qwgan-raw', 'dmwgan', 'infogan'"),
                          (["--steps", "0"], "--steps must be >= 1"), (["--threshold", "1.5"], "in (0, 1]")):
        with pytest.raises(SystemExit) as exit_info:
            ttq.main([*argv, "--out", str(tmp_path)])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit, match="run the benchmark first"):
        ttq.main(["--report", "--out", str(tmp_path / "none")])


def _run(out: Path, *extra: str) -> str:
    argv = [sys.executable, str(SCRIPT), "--smoke", "--out", str(out), "--runs", str(out.parent / "runs"), *extra]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_smoke_run_resumes_skips_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "ttq"
    _run(out, "--models", "qwgan", "--steps", "2")        # a shorter run first: the next one resumes it
    _run(out)                                             # --smoke: 4 steps, a report every 2
    res = json.loads((out / "results.json").read_text())
    assert list(res["models"]) == list(LABELS)
    for name, m in res["models"].items():
        assert m["label"] == LABELS[name] and m["finished"] and m["steps"] == 4
        assert [p["step"] for p in m["points"]] == [2, 4]
        assert all(p["seconds"] > 0 and 0.0 <= p["nmi"] <= 1.0 for p in m["points"])
        assert m["end"] == m["points"][-1] and m["best"] is not None
        assert "--fid-samples" in m["invocations"][-1]["argv"]
    assert res["models"]["qwgan"]["processes"] == 2 and "--resume" in res["models"]["qwgan"]["invocations"][1]["argv"]
    assert res["models"]["dmwgan"]["settings"]["beta1"] == 0.5 == res["models"]["infogan"]["settings"]["beta1"]
    assert res["models"]["qwgan"]["settings"]["ema"] > 0 and res["models"]["qwgan-raw"]["settings"]["ema"] == 0
    page = (out / "TIME_TO_QUALITY.md").read_text()
    assert all(f"| {label} (`{name}`)" in page for name, label in LABELS.items())
    assert (out / "nmi_vs_seconds.png").stat().st_size > 1000
    for name in LABELS:  # the trainers' own files beside the page; their checkpoints stay in --runs
        assert json.loads((out / f"{name}_metrics.json").read_text())["final"]["steps"] == 4
        assert (out / f"{name}_samples.png").is_file() and f"({name}_samples.png)" in page
    assert not list(out.rglob("*.pt")) and (out.parent / "runs" / "qwgan" / "checkpoint.pt").is_file()

    again = _run(out)                                     # everything finished: nothing retrained
    assert again.count("not retrained") == len(LABELS)
    _run(out, "--report", "--threshold", "0.01")
    assert "NMI(manifold; class) ≥ 0.01" in (out / "TIME_TO_QUALITY.md").read_text()
