"""Smoke test of benchmarks/reproduce_table1.py: the study writes its results file, a rerun does
not retrain, a lost results line is re-evaluated from the checkpoint without retraining, and
``--report-only`` writes the generated block from the results file."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "reproduce_table1.py"
MODELS = "wgan,qbvae"  # one GAN (Eq. 3 inversion encoder) and one Q-VAE (tangential spread logged)


def _run(out: Path, *extra: str) -> str:
    cmd = [sys.executable, str(SCRIPT), "--smoke", "--data-dir", "embedded", "--models", MODELS,
           "--out", str(out), *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.slow
def test_study_results_resume_and_report(tmp_path: Path) -> None:
    out = tmp_path / "study"
    first = _run(out)
    results = out / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert sorted(r["model"] for r in rows) == ["qbvae", "wgan"]
    for r in rows:
        assert r["seed"] == 0 and r["preset"] == "smoke"
        for key in ("mnist_fid", "dis_slant", "dis_width"):
            assert math.isfinite(r[key]), (key, r)
        assert r["dis_slant"] >= 1.0 and r["dis_width"] >= 1.0  # λ1/λ2 of sorted eigenvalues
    spread = next(r for r in rows if r["model"] == "qbvae")["tangential_spread"]
    assert len(spread) == 2 and all(v > 0 for v in spread.values()), spread  # the decoder's two FC layers
    assert next(r for r in rows if r["model"] == "wgan")["tangential_spread"] == {}  # A = 1: no spread
    assert "training" in first
    for r in rows:  # each run's final manifold-class report travels into its results line
        mc = r["manifold_classes"]
        assert set(mc) == {"nmi", "purity", "distinct_majorities", "confident", "min_class_share", "diversity"}, mc
        assert 0.0 <= mc["nmi"] <= 1.0 and 1 <= mc["distinct_majorities"] <= 10, mc

    ckpts = {m: out / f"{m}_s0" / "checkpoint.pt" for m in ("wgan", "qbvae")}
    stamps = {m: p.stat().st_mtime_ns for m, p in ckpts.items()}
    logs = {m: (out / f"{m}_s0" / "train.log").read_text() for m in ckpts}

    second = _run(out)  # everything done: skipped, nothing retrained or re-evaluated
    assert second.count("skipped") == 2, second
    assert len(results.read_text().splitlines()) == 2

    # a results line lost (killed during evaluation): re-evaluated from the checkpoint, not retrained
    results.write_text(next(line for line in results.read_text().splitlines() if '"wgan"' in line) + "\n")
    third = _run(out)
    assert third.count("skipped") == 1, third
    rows3 = [json.loads(line) for line in results.read_text().splitlines()]
    assert sorted(r["model"] for r in rows3) == ["qbvae", "wgan"]
    assert {m: p.stat().st_mtime_ns for m, p in ckpts.items()} == stamps
    assert {m: (out / f"{m}_s0" / "train.log").read_text() for m in ckpts} == logs  # no new example call

    doc = tmp_path / "RESULTS.md"
    doc.write_text("# Results\n\nhand-written text stays\n")
    _run(out, "--report-only", "--no-grids", "--doc", str(doc), "--assets", str(tmp_path / "assets"))
    text = doc.read_text()
    assert "hand-written text stays" in text
    assert "<!-- BEGIN generated:smoke -->" in text and "<!-- END generated:smoke -->" in text
    fid = next(r["mnist_fid"] for r in rows3 if r["model"] == "wgan")
    assert f"{fid:.2f}" in text  # the table's number comes from the results file
    nmi = next(r["manifold_classes"]["nmi"] for r in rows3 if r["model"] == "wgan")
    assert "Manifold-class report" in text and f"| WGAN | {nmi:.3f} |" in text
    assert (tmp_path / "assets" / "spread_vae_smoke.png").is_file()
    assert (tmp_path / "assets" / "results_smoke.jsonl").read_text() == results.read_text()


def _table1_reporting():  # noqa: ANN202 - the study's package, as its script imports it
    if str(REPO / "benchmarks") not in sys.path:
        sys.path.insert(0, str(REPO / "benchmarks"))
    import table1.config
    import table1.reporting

    return table1.config, table1.reporting


def test_manifold_class_table_is_the_mean_over_seeds_and_absent_without_reports() -> None:
    config, reporting = _table1_reporting()
    budget = config.PRESETS["quick"]
    base = {"steps": 10, "batch_size": 8, "mnist_fid": 50.0, "dis_slant": 1.5, "dis_width": 1.5,
            "sec_per_step": 0.1, "example_wall_s": 10.0, "dis_eval_s": 5.0, "tangential_spread": {}}
    rep = {"purity": 0.5, "distinct_majorities": 6, "confident": 0.8, "min_class_share": 0.05, "diversity": 0.9}
    rows = [{**base, "model": "qwgan", "seed": 0, "manifold_classes": {**rep, "nmi": 0.2}},
            {**base, "model": "qwgan", "seed": 1, "manifold_classes": {**rep, "nmi": 0.4, "distinct_majorities": 8}},
            {**base, "model": "wgan", "seed": 0, "manifold_classes": None}]
    text = reporting.render_tables(rows, budget, ["wgan", "qwgan"], REPO, {"results": "r.jsonl"}, "cmd")
    assert "| Q-WGAN | 0.300 ± 0.141 | 0.500 ± 0.000 | 7.0 ± 1.4 |" in text, text
    assert "| WGAN | — | — | — | — | — | — |" in text, text
    old = [{k: v for k, v in r.items() if k != "manifold_classes"} for r in rows]  # rows that carry no report
    assert "Manifold-class report" not in reporting.render_tables(old, budget, ["wgan", "qwgan"], REPO,
                                                                  {"results": "r.jsonl"}, "cmd")


def test_spread_table_takes_the_checkpoints_tangential_spread_before_the_training_log() -> None:
    config, reporting = _table1_reporting()
    budget = config.PRESETS["recipe"]
    base = {"steps": 10, "batch_size": 8, "mnist_fid": 50.0, "dis_slant": 1.5, "dis_width": 1.5,
            "sec_per_step": 0.1, "example_wall_s": 10.0, "dis_eval_s": 5.0}
    rows = [{**base, "model": "qwgan", "seed": s, "tangential_spread": {"fc.0": 9.0}} for s in (0, 1)]
    rows += [{**base, "model": "qwgan-l0", "seed": 0, "tangential_spread": {"fc.0": 3.0}}]
    structure = {"qwgan": [{"diversity": 1.0, "bias_spread": {"fc.0": 8.0}, "tangential_spread": {"fc.0": 1e-2}},
                           {"diversity": 1.0, "bias_spread": {"fc.0": 2.0}, "tangential_spread": {"fc.0": 1e-4}}],
                 "qwgan-l0": [{"diversity": 0.5}]}  # no spread from the checkpoint: the log's is shown
    text = reporting.render_tables(rows, budget, ["qwgan", "qwgan-l0"], REPO, {"results": "r.jsonl"}, "cmd",
                                   structure)
    assert "| Q-WGAN | fc.0: 0.001 | fc.0: 4 | 1.000 ± 0.000 |" in text, text  # geometric means
    assert "| Q-WGAN λ=0 | fc.0: 3 | — | 0.500 |" in text, text


def test_recipe_study_trains_each_gan_with_the_main_examples_recipe(tmp_path: Path) -> None:
    config, _ = _table1_reporting()
    import table1.running as running

    smoke, full = config.PRESETS["smoke"], config.PRESETS["full"]
    recipe = config.PRESETS["recipe"]
    assert recipe.recipe == "ours" and full.recipe == "paper" and smoke.recipe == "paper"

    def cmd(model: str, b: config.Budget) -> list[str]:
        line = running.train_command(model, 0, b, tmp_path / model, None, resume=False)
        return [Path(line[1]).relative_to(REPO).as_posix(), *line[2:]]

    assert cmd("qwgan", recipe)[:1] == ["examples/mnist_qwgan.py"] and "--model" not in cmd("qwgan", recipe)
    assert cmd("qwgan-l0", recipe)[:3] == ["examples/mnist_qwgan.py", "--lam", "0"]
    assert cmd("wgan", recipe)[:5] == ["examples/mnist_qwgan.py", "--num-biases", "1", "--info", "0"]
    assert cmd("dmwgan", recipe)[:5] == ["benchmarks/table1/train_gan.py", "--model", "dmwgan", "--beta1", "0.5"]
    for model in config.GAN_MODELS:  # Appendix B's settings: the study's trainer, --model, default β1
        assert cmd(model, full)[:3] == ["benchmarks/table1/train_gan.py", "--model", model]
        script_and_flags = cmd(model, replace(full, recipe="ours"))
        assert script_and_flags[:script_and_flags.index("--seed")] == cmd(model, recipe)[:script_and_flags.index("--seed")]
    steps = cmd("qwgan", recipe)
    assert steps[steps.index("--steps") + 1] == "2400" and steps[steps.index("--batch-size") + 1] == "32"

    # a finished run of the other recipe is not this study's result
    row = {"model": "qwgan", "seed": 0, "steps": 2400, **recipe.eval_key()}
    assert running._done([{**row, "recipe": "ours"}], "qwgan", 0, recipe)
    assert not running._done([{**row, "recipe": "paper"}], "qwgan", 0, recipe)
    assert not running._done([row], "qwgan", 0, recipe)  # rows without the key are Appendix B's


def test_recipe_study_refuses_the_vaes() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--recipe", "--models", "qwgan,qbvae"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--models qbvae: the recipe is the GANs'" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_recipe_study_smoke_scores_the_moving_average(tmp_path: Path) -> None:
    out = tmp_path / "study"
    cmd = [sys.executable, str(SCRIPT), "--smoke", "--gan-recipe", "ours", "--data-dir", "embedded",
           "--models", "qwgan", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (row,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert row["recipe"] == "ours" and row["model"] == "qwgan"
    assert "examples/mnist_qwgan.py" in (out / "qwgan_s0" / "train.log").read_text()
    assert math.isfinite(row["mnist_fid"]) and row["dis_slant"] >= 1.0 and row["manifold_classes"] is not None
    assert "ema" in torch.load(out / "qwgan_s0" / "checkpoint.pt", weights_only=False)["modules"]
    # the report's spread table reads the sampled (moving-average) generator's banks
    _, reporting = _table1_reporting()
    from table1.evaluating import load_generator
    from qmm_plugin.regularizer import tangential_spread

    structure = reporting.manifold_structure("qwgan", out / "qwgan_s0")
    g = load_generator("qwgan", out / "qwgan_s0")
    assert structure["tangential_spread"] == tangential_spread(g.multi_bias_layers())
    assert set(structure["tangential_spread"]) == set(structure["bias_spread"]) == set(g.multi_bias_layers())


def test_an_evaluation_subprocess_takes_its_data_from_the_payload(tmp_path: Path) -> None:
    """The study's ``--evaluate-run`` child gets no --data-dir: the default folder need not exist
    (a clone without ../shared), the payload names the data; a study still refuses a missing folder."""
    _table1_reporting()
    import reproduce_table1

    missing = str(tmp_path / "no_mnist_here")
    args = reproduce_table1.parse_args(["--evaluate-run", str(tmp_path), "--payload", "{}", "--data-dir", missing])
    assert args.evaluate_run == str(tmp_path)
    with pytest.raises(SystemExit):
        reproduce_table1.parse_args(["--smoke", "--data-dir", missing])
