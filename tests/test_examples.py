"""Smoke tests of the examples (each runs the script's ``--smoke`` in a subprocess).

Unmarked: the main job's smoke (``mnist_qwgan.py --smoke``). ``slow``: the
other examples, exact ``--resume``, every ``--model``, and the 2-process torchrun run.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
STUDY_GAN = "../benchmarks/table1/train_gan.py"  # the Table 1 study's GAN trainer (every --model, torchrun)
TILE = 28 * 2 + 2  # one 28-px image at scale 2 + 2 px padding (viz.make_grid layout)


def run_example(script: str, *args: str, cwd: Path, launcher: tuple[str, ...] = ()) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *launcher, str(EXAMPLES / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{script} {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def grid_shape(path: Path) -> tuple[int, int]:
    """(rows, columns) of 28-px tiles in a PNG written with scale=2."""
    with Image.open(path) as img:
        img.load()
        w, h = img.size
    assert (h - 2) % TILE == 0 and (w - 2) % TILE == 0, (h, w)
    return (h - 2) // TILE, (w - 2) // TILE


def load_metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


# ------------------------------------------------------------------------------- smoke runs
def test_mnist_qwgan_smoke(tmp_path: Path) -> None:
    out = tmp_path / "run"
    stdout = run_example("mnist_qwgan.py", "--smoke", "--steps", "2", "--fid-samples", "50",
                         "--no-progress", "--out", str(out), cwd=tmp_path)
    assert "MNIST-FID" in stdout and "distinct majority classes" in stdout  # the manifold-class report
    with Image.open(out / "samples_step2.png") as img:  # 10 rows x 10 shared z, plus the row-label margin
        assert img.size[1] == 10 * TILE + 2 and img.size[0] > 10 * TILE + 2
    metrics = load_metrics(out)
    assert math.isfinite(metrics["final"]["mnist_fid"]) and metrics["final"]["mnist_fid"] > 0
    report = metrics["final"]["report"]
    assert len(report["majority"]) == 10 and 0.0 <= report["nmi"] <= 1.0
    assert sum(report["coverage"]) == pytest.approx(1.0, abs=1e-3)
    last = metrics["rows"][-1]
    for key in ("loss_d", "loss_g", "r_ba", "info", "report/nmi"):
        assert math.isfinite(last[key]), key
    assert (out / "metrics.csv").read_text().startswith("step,")
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 2 and ckpt["settings"]["model"] == "qwgan"


@pytest.mark.slow
@pytest.mark.parametrize("script,modules,loss", [("mnist_qwgan.py", ("generator", "critic", "recover", "ema"), "loss_g"),
                                                 ("mnist_qbvae.py", ("decoder", "encoder"), "loss")])
def test_resume_continues_exactly(tmp_path: Path, script: str, modules: tuple[str, ...], loss: str) -> None:
    common = ("--smoke", "--fid-samples", "0", "--no-progress")
    run_example(script, *common, "--steps", "4", "--out", str(tmp_path / "straight"), cwd=tmp_path)
    run_example(script, *common, "--steps", "2", "--out", str(tmp_path / "split"), cwd=tmp_path)
    run_example(script, *common, "--steps", "4", "--resume", "--out", str(tmp_path / "split"), cwd=tmp_path)
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 4
    for name in modules:
        for key, value in a["modules"][name].items():
            assert torch.equal(value, b["modules"][name][key]), f"{name}.{key} differs after resume"
    assert [r[loss] for r in a["metrics"]["rows"]] == [r[loss] for r in b["metrics"]["rows"]]


@pytest.mark.slow
@pytest.mark.parametrize("model,rows", [("wgan", 1), ("qwgan-l0", 10), ("dmwgan", 10), ("madgan", 10),
                                        ("infogan", 10)])
def test_mnist_qwgan_baselines_smoke(tmp_path: Path, model: str, rows: int) -> None:
    out = tmp_path / model
    run_example(STUDY_GAN, "--smoke", "--steps", "2", "--fid-samples", "50", "--no-progress",
                "--model", model, "--out", str(out), cwd=tmp_path)
    with Image.open(out / "samples_step2.png") as img:  # rows x 10 shared latents, plus the row-label margin
        assert img.size[1] == rows * TILE + 2 and img.size[0] > 10 * TILE + 2
    final = load_metrics(out)["final"]
    assert math.isfinite(final["mnist_fid"])
    assert len(final["report"]["majority"]) == rows  # the manifold-class report, one row per manifold


@pytest.mark.slow
def test_mnist_qwgan_torchrun_two_processes(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    run_example(STUDY_GAN, "--smoke", "--steps", "2", "--fid-samples", "50", "--no-progress",
                "--out", str(out), cwd=tmp_path,
                launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"))
    assert load_metrics(out)["final"]["steps"] == 2
    assert torch.load(out / "checkpoint.pt", weights_only=False)["settings"]["world_size"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("model,rows", [("qbvae", 10), ("bvae", 1)])
def test_mnist_qbvae_smoke(tmp_path: Path, model: str, rows: int) -> None:
    out = tmp_path / model
    stdout = run_example("mnist_qbvae.py", "--smoke", "--no-progress", "--model", model, "--out", str(out),
                         cwd=tmp_path)
    assert "distinct majority classes" in stdout  # the manifold-class report
    with Image.open(out / "samples_step2.png") as img:  # rows x 10 shared z, plus the row-label margin
        assert img.size[1] == rows * TILE + 2 and img.size[0] > 10 * TILE + 2
    metrics = load_metrics(out)
    assert math.isfinite(metrics["final"]["mnist_fid"])
    report = metrics["final"]["report"]
    assert len(report["majority"]) == rows and sum(report["coverage"]) == pytest.approx(1.0, abs=1e-3)
    assert all(math.isfinite(r["nll"]) and math.isfinite(r["kl"]) for r in metrics["rows"])
    assert "report/nmi" in metrics["rows"][-1]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 2 and ckpt["settings"]["num_biases"] == rows


@pytest.mark.slow
@pytest.mark.parametrize("flag,rows", [((), 10), (("--no-qmm",), 1)])
def test_wrap_your_gan_smoke(tmp_path: Path, flag: tuple[str, ...], rows: int) -> None:
    run_example("wrap_your_gan.py", "--smoke", *flag, "--out", str(tmp_path / "w"), cwd=tmp_path)
    assert grid_shape(tmp_path / "w" / "samples.png") == (rows, 10)


@pytest.mark.slow
def test_generalize_smoke(tmp_path: Path) -> None:
    out = tmp_path / "g"
    run_example("generalize.py", "--smoke", "--out", str(out), cwd=tmp_path)
    report = json.loads((out / "generalize.json").read_text())
    assert set(report) == {"noise", "colour", "letters"}
    for kind in report:
        assert grid_shape(out / f"generalize_{kind}.png") == (2, 2 + 3)
        assert math.isfinite(report[kind]["reconstruction_mse"])
    with Image.open(out / "generalize_colour.png") as img:
        assert img.mode == "RGB"
