"""The README's main-job numbers are the committed run's numbers (``docs/results/main_job``,
written by ``scripts/main_job_fresh_clone.py``), so the two cannot drift apart."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results" / "main_job"
#: The main job's targets (issue 12): thresholds the README compares against, not results.
TARGETS = {"0.6", "80%", "5%", "0.5"}


def main_job_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("## The main job")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def committed() -> tuple[dict, dict]:
    metrics = json.loads((RESULTS / "metrics.json").read_text())
    run = json.loads((RESULTS / "run.json").read_text())
    return metrics, run


def result_strings(metrics: dict, run: dict) -> set[str]:
    """Every way the README may print a committed number."""
    values: list[float] = [metrics["final"]["mnist_fid"]]
    report = metrics["final"]["report"]
    values += [v for v in report.values() if isinstance(v, (int, float))]
    out: set[str] = set()
    for v in values:
        out |= {f"{v:.2f}", f"{v:.3f}", f"{v:.1f}", f"{100 * v:.0f}%", f"{100 * v:.1f}%", str(v)}
    minutes, seconds = divmod(round(run["wall_s"]), 60)
    out.add(f"{minutes} min {seconds} s")
    out.add(str(metrics["final"]["steps"]))
    return out


def test_main_job_run_succeeded_on_the_readme_command() -> None:
    metrics, run = committed()
    first_line = re.search(r"```bash\n(.*?)\n", (REPO / "README.md").read_text()).group(1)
    assert run["returncode"] == 0
    assert run["command"] == first_line.split("#", 1)[0].strip()
    assert metrics["final"]["steps"] == metrics["rows"][-1]["step"]
    # the committed run trained as long as the example does by default
    spec = importlib.util.spec_from_file_location("qmm_example_qwgan", REPO / "examples" / "mnist_qwgan.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert metrics["final"]["steps"] == example.parse_args([]).steps


def test_readme_main_job_numbers_come_from_the_committed_run() -> None:
    metrics, run = committed()
    section = main_job_section()
    allowed = result_strings(metrics, run)
    settings = (REPO / "examples" / "mnist_qwgan.py").read_text()
    for token in re.findall(r"\d+ min \d+ s|\d+\.\d+%?|\d+%", section):
        if token in TARGETS or ("%" not in token and " min " not in token and token in settings):
            continue  # a target, or a setting of the example (λ, β1, ...), not a result
        assert token in allowed, f"README's main-job section quotes {token!r}, which is not in {RESULTS}"
    report = metrics["final"]["report"]
    assert f"| NMI(manifold; class) | {report['nmi']:.2f} " in section
    assert f"| {report['distinct_majorities']} | ≥ 8 |" in section
    assert f"| {metrics['final']['mnist_fid']:.2f} |" in section
    minutes, seconds = divmod(round(run["wall_s"]), 60)
    assert f"{minutes} min {seconds} s" in section
