"""Smoke tests of the examples (each runs the script's ``--smoke`` in a subprocess) and unit tests
of the example plumbing (``examples/_common.py``, the Q-β-VAE's all-decoder likelihood).

Unmarked: the main job's smoke (``mnist_qwgan.py --smoke``) and fast unit tests. ``slow``: the
other examples, exact ``--resume``, every ``--model``, and the 2-process torchrun run.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from PIL import Image

import qmm_plugin

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TILE = 28 * 2 + 2  # one 28-px image at scale 2 + 2 px padding (viz.make_grid layout)


def _module(name: str) -> ModuleType:
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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


# ------------------------------------------------------------------------------- unit tests
def test_decode_all_manifolds_equals_one_forward_per_manifold() -> None:
    vae = _module("mnist_qbvae")
    torch.manual_seed(0)
    q = qmm_plugin.convert(qmm_plugin.models.beta_vae_decoder(8), num_biases=3)
    z = torch.randn(2, 8)
    stacked = vae.decode_all_manifolds(q, z)
    assert stacked.shape == (3, 2, 1, 28, 28)
    for i in range(3):
        torch.testing.assert_close(stacked[i], q(z, manifold=i), rtol=1e-5, atol=1e-5)
    # the manifolds really differ (so the check above can fail if rows were mixed up)
    assert (stacked[0] - stacked[1]).abs().max() > 1e-3


def test_em_responsibilities_sum_to_one_and_pick_the_best_decoder() -> None:
    vae = _module("mnist_qbvae")
    torch.manual_seed(1)
    q = qmm_plugin.convert(qmm_plugin.models.beta_vae_decoder(8), num_biases=4)
    enc = qmm_plugin.models.BetaVAEEncoder(8)
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    terms = vae.em_losses(q, enc, x, beta=4.0)
    torch.testing.assert_close(terms["gamma"].sum(0), torch.ones(3))
    assert torch.isfinite(terms["loss"]) and terms["loss"].requires_grad


def test_em_loss_takes_r_ba_from_the_decoder_forward() -> None:
    """λ > 0: the M-step loss adds λ·R_BA, with R_BA (from the stacked forward) equal to the
    separate q.ba_regularizer() in value and in its gradient on every converted layer."""
    vae = _module("mnist_qbvae")
    torch.manual_seed(2)
    q = qmm_plugin.convert(qmm_plugin.models.beta_vae_decoder(8), num_biases=4)
    enc = qmm_plugin.models.BetaVAEEncoder(8)
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    torch.manual_seed(5)
    plain = vae.em_losses(q, enc, x, beta=4.0)
    torch.manual_seed(5)  # the same reparameterisation noise
    terms = vae.em_losses(q, enc, x, beta=4.0, lam=0.5)
    assert "r_ba" not in plain
    separate = q.ba_regularizer()
    torch.testing.assert_close(terms["r_ba"], separate)
    torch.testing.assert_close(terms["loss"], plain["loss"] + 0.5 * separate)
    params = [p for layer in q.multi_bias_layers().values() for p in (layer.weight, layer.bias_bank)]
    got = torch.autograd.grad(terms["r_ba"], params)
    ref = torch.autograd.grad(separate, params)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_sharded_batches_are_deterministic_and_disjoint_across_ranks() -> None:
    common = _module("_common")
    data = torch.arange(100).float()
    shards = [common.ShardedBatches(data, 10, seed=3, rank=r, world_size=2) for r in range(2)]
    epoch0 = [torch.cat([s.batch(k, torch.device("cpu")) for k in range(5)]) for s in shards]
    assert set(epoch0[0].tolist()).isdisjoint(epoch0[1].tolist())
    assert sorted(torch.cat(epoch0).tolist()) == list(range(100))
    again = common.ShardedBatches(data, 10, seed=3, rank=1, world_size=2)
    assert torch.equal(again.batch(7, torch.device("cpu")), shards[1].batch(7, torch.device("cpu")))
    assert not torch.equal(shards[0].batch(0, torch.device("cpu")), shards[0].batch(5, torch.device("cpu")))


def test_metrics_log_writes_csv_and_json(tmp_path: Path) -> None:
    common = _module("_common")
    log = common.MetricsLog(tmp_path, enabled=True)
    log.log({"step": 1, "loss": 0.5})
    log.log({"step": 2, "loss": 0.25, "fid": 3.0})
    log.final["mnist_fid"] = 3.0
    log.write()
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0] == "step,loss,fid" and lines[1] == "1,0.5," and lines[2] == "2,0.25,3.0"
    assert load_metrics(tmp_path)["final"] == {"mnist_fid": 3.0}


# ------------------------------------------------------------------------------- smoke runs
def test_mnist_qwgan_smoke(tmp_path: Path) -> None:
    out = tmp_path / "run"
    stdout = run_example("mnist_qwgan.py", "--smoke", "--steps", "2", "--fid-samples", "50",
                         "--no-progress", "--out", str(out), cwd=tmp_path)
    assert "MNIST-FID" in stdout
    assert grid_shape(out / "samples_step2.png") == (10, 10)  # A = 10 manifolds x 10 shared z
    metrics = load_metrics(out)
    assert math.isfinite(metrics["final"]["mnist_fid"]) and metrics["final"]["mnist_fid"] > 0
    last = metrics["rows"][-1]
    for key in ("loss_d", "loss_g", "r_ba", "tangential_spread/fc.0", "tangential_spread/fc.3"):
        assert math.isfinite(last[key]), key
    assert (out / "metrics.csv").read_text().startswith("step,")
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 2 and ckpt["settings"]["model"] == "qwgan"


@pytest.mark.slow
def test_mnist_qwgan_resume_continues_exactly(tmp_path: Path) -> None:
    common = ("--smoke", "--fid-samples", "0", "--no-progress")
    run_example("mnist_qwgan.py", *common, "--steps", "4", "--out", str(tmp_path / "straight"), cwd=tmp_path)
    run_example("mnist_qwgan.py", *common, "--steps", "2", "--out", str(tmp_path / "split"), cwd=tmp_path)
    run_example("mnist_qwgan.py", *common, "--steps", "4", "--resume", "--out", str(tmp_path / "split"),
                cwd=tmp_path)
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 4
    for name in ("generator", "critic"):
        for key, value in a["modules"][name].items():
            assert torch.equal(value, b["modules"][name][key]), f"{name}.{key} differs after resume"
    assert [r["loss_g"] for r in a["metrics"]["rows"]] == [r["loss_g"] for r in b["metrics"]["rows"]]


@pytest.mark.slow
@pytest.mark.parametrize("model,rows", [("wgan", 1), ("qwgan-l0", 10), ("dmwgan", 10), ("madgan", 10),
                                        ("infogan", 10)])
def test_mnist_qwgan_baselines_smoke(tmp_path: Path, model: str, rows: int) -> None:
    out = tmp_path / model
    run_example("mnist_qwgan.py", "--smoke", "--steps", "2", "--fid-samples", "50", "--no-progress",
                "--model", model, "--out", str(out), cwd=tmp_path)
    assert grid_shape(out / "samples_step2.png") == (rows, 10)
    assert math.isfinite(load_metrics(out)["final"]["mnist_fid"])


@pytest.mark.slow
def test_mnist_qwgan_torchrun_two_processes(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    run_example("mnist_qwgan.py", "--smoke", "--steps", "2", "--fid-samples", "50", "--no-progress",
                "--out", str(out), cwd=tmp_path,
                launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"))
    assert load_metrics(out)["final"]["steps"] == 2
    assert torch.load(out / "checkpoint.pt", weights_only=False)["settings"]["world_size"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("model,rows", [("qbvae", 10), ("bvae", 1)])
def test_mnist_qbvae_smoke(tmp_path: Path, model: str, rows: int) -> None:
    out = tmp_path / model
    run_example("mnist_qbvae.py", "--smoke", "--no-progress", "--model", model, "--out", str(out), cwd=tmp_path)
    assert grid_shape(out / "samples_step2.png") == (rows, 10)
    metrics = load_metrics(out)
    assert math.isfinite(metrics["final"]["mnist_fid"])
    assert all(math.isfinite(r["nll"]) and math.isfinite(r["kl"]) for r in metrics["rows"])


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
