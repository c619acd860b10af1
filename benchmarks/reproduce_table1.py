#!/usr/bin/env python
r"""Reproduce the MNIST half of the paper's Table 1 at CPU scale: one resumable study.

Trains WGAN, Q-WGAN, Q-WGAN λ=0, DMWGAN-style (``examples/mnist_qwgan.py``) and β-VAE, Q-β-VAE,
Q-β-VAE λ=0 (``examples/mnist_qbvae.py``) on MNIST for several seeds — each run is a subprocess
of the example script, so the study uses exactly the examples' training code — then evaluates
every run from its checkpoint and appends one JSON line per (model, seed) to
``OUT/results.jsonl``:

* **MNIST-FID** (:class:`qmm_plugin.paper.metrics.MNISTFID`, computed by the example at the end of
  training): generated images by ancestral sampling (z ~ N(0, I), manifold/generator i ~ uniform)
  against the whole test split (10,000 digits with the full MNIST).
* **Disentanglement** (Appendix D; :func:`qmm_plugin.paper.metrics.disentanglement_score`) for the
  slant and width transforms of the first ``dis_images`` test digits at ``dis_strengths``
  strengths. Encoder: the encoder mean for the VAEs; for every GAN a latent-only fit on its
  trained manifolds (:class:`LatentEncoder`, which says why not ``q.invert(x).z``).

Per-run tangential spread (Theorem 1's right side) is logged by the examples over training;
``--report`` plots it (log scale, Q vs λ = 0, like the paper's Fig. H.4), draws the Fig. 5/6
generalisation grids from the trained Q-WGAN (seed 0), and rewrites the generated blocks of
``docs/RESULTS.md`` from the results file (every number in those blocks comes from it).

Budget (equal data per model inside each family: the same steps × batch; wall times are measured
and reported; a Q-β-VAE step costs about A times a β-VAE step, so equal data is not equal time):

=========  ===============================================  =====================================
preset     GANs (one critic + one generator update / step)  VAEs (10 EM iterations per step)
=========  ===============================================  =====================================
quick      2 seeds, 100 steps × 32, FID on 2,000 samples     2 seeds, 5 steps × 32 
full       3 seeds, 1,000 steps × 64, FID on 10,000          3 seeds, 30 steps × 64
smoke      the examples' ``--smoke`` (tests; seconds)
=========  ===============================================  =====================================

Measured on this 2-core machine with one thread per run: a Q-WGAN step (B = 32) ≈ 0.6-0.9 s,
a Q-β-VAE step ≈ 11-13 s, a β-VAE step ≈ 3 s — the ten EM iterations over A = 10 decoders make
the VAEs the bottleneck, hence their few steps. Two runs go at a time (``--jobs 2``, one thread
each; each then runs about half as fast, so the gain over one job is small). Full: the 21 runs sum to
about 4.4 h of run time, a little over 2 h elapsed two at a time (14 of them took 81 minutes in
one session); quick: about 10 minutes (10 min 15 s, report included, on the idle machine).

Disentanglement sizes: quick 6 digits × 7 strengths, 50 fit steps; full 10 digits × 11
strengths, 100 fit steps (the paper: 500 × 11). ``--gan-steps/--vae-steps/--seeds`` override.

Resumable: a stopped study (Ctrl-C, killed session) continues where it stopped when rerun with
the same command — finished (model, seed) pairs are skipped (found in ``results.jsonl``), an
unfinished run continues from its checkpoint (``--resume`` of the example), a run whose training
finished is only evaluated.

Usage::

    python benchmarks/reproduce_table1.py --quick                 # ~10 min on 2 cores
    python benchmarks/reproduce_table1.py                         # full (hours), resumable
    python benchmarks/reproduce_table1.py --quick --report        # (re)write docs/RESULTS.md blocks
    python benchmarks/reproduce_table1.py --smoke --data-dir embedded --out /tmp/s   # seconds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qmm_plugin import fit_codes
from qmm_plugin.io import atomic_write_text
from qmm_plugin.paper.data import load_mnist, to_model_range
from qmm_plugin.paper.gan_families import make_family
from qmm_plugin.paper.metrics import disentanglement_score
from qmm_plugin.paper.vae_em import Z_DIM

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "mnist"
DOCS = REPO / "docs"

#: model -> (example script, display name). Order = table order.
MODELS: dict[str, tuple[str, str]] = {
    "wgan": ("mnist_qwgan.py", "WGAN"),
    "dmwgan": ("mnist_qwgan.py", "DMWGAN-style"),
    "qwgan": ("mnist_qwgan.py", "Q-WGAN"),
    "qwgan-l0": ("mnist_qwgan.py", "Q-WGAN λ=0"),
    "bvae": ("mnist_qbvae.py", "β-VAE"),
    "qbvae": ("mnist_qbvae.py", "Q-β-VAE"),
    "qbvae-l0": ("mnist_qbvae.py", "Q-β-VAE λ=0"),
}
GAN_MODELS = ("wgan", "dmwgan", "qwgan", "qwgan-l0")
#: Order in which a study trains the models of one seed (the central comparison first, so a
#: stopped study has it); tables keep the MODELS order.
PRIORITY = ("qwgan", "qwgan-l0", "wgan", "dmwgan", "qbvae", "qbvae-l0", "bvae")

#: The paper's Table 1, MNIST rows (mean ± std over 10 runs).
#: DMWGAN is the paper's DMWGAN (learned π); ours is the DMWGAN-style baseline with uniform π.
PAPER_TABLE1: dict[str, dict[str, tuple[float, float]]] = {
    "wgan": {"fid": (10.13, 3.16), "slant": (1.62, 0.41), "width": (1.68, 0.49)},
    "dmwgan": {"fid": (5.41, 0.34), "slant": (1.08, 0.04), "width": (1.11, 0.06)},
    "qwgan": {"fid": (5.69, 0.89), "slant": (2.15, 0.17), "width": (2.93, 0.60)},
    "qwgan-l0": {"fid": (15.74, 10.00), "slant": (1.76, 0.35), "width": (2.75, 0.67)},
    "bvae": {"fid": (58.43, 0.23), "slant": (5.04, 1.19), "width": (5.63, 0.75)},
    "qbvae": {"fid": (41.74, 1.40), "slant": (5.93, 1.78), "width": (5.71, 1.06)},
    "qbvae-l0": {"fid": (40.74, 2.03), "slant": (5.18, 0.77), "width": (5.00, 0.77)},
}


# ----------------------------------------------------------------------------------- budget
@dataclass(frozen=True)
class Budget:
    """Everything that defines a study: training budget per family and evaluation sizes."""

    preset: str
    seeds: int
    gan_steps: int
    vae_steps: int
    batch_size: int
    fid_samples: int
    dis_images: int  # source images per transform (paper: 500)
    dis_strengths: int  # strengths per image (paper: 11)
    inversion_steps: int  # cap on Eq. 3 Adam steps per image (q.invert's plateau schedule stops earlier)
    grid_inversion_steps: int  # Eq. 3 steps for the Fig. 5/6 generalisation grids
    curve_points: int  # sample grids + exact tangential spread (a Gram eigendecomposition per layer) per run
    smoke: bool = False

    def steps(self, model: str) -> int:
        return self.gan_steps if model in GAN_MODELS else self.vae_steps

    def eval_key(self) -> dict[str, int]:
        """The evaluation settings a stored result must match to be reused."""
        return {"fid_samples": self.fid_samples, "dis_images": self.dis_images,
                "dis_strengths": self.dis_strengths, "inversion_steps": self.inversion_steps}


PRESETS: dict[str, Budget] = {
    "full": Budget("full", seeds=3, gan_steps=1000, vae_steps=30, batch_size=64, fid_samples=10000,
                   dis_images=10, dis_strengths=11, inversion_steps=100, grid_inversion_steps=500, curve_points=20),
    "quick": Budget("quick", seeds=2, gan_steps=100, vae_steps=5, batch_size=32, fid_samples=2000,
                    dis_images=6, dis_strengths=7, inversion_steps=50, grid_inversion_steps=300, curve_points=5),
    "smoke": Budget("smoke", seeds=1, gan_steps=4, vae_steps=2, batch_size=20, fid_samples=200,
                    dis_images=2, dis_strengths=3, inversion_steps=3, grid_inversion_steps=3, curve_points=1,
                    smoke=True),
}


# ------------------------------------------------------------------------------- examples
def train_command(model: str, seed: int, b: Budget, run_dir: Path, data_dir: str | None, resume: bool) -> list[str]:
    """The example command line of one run."""
    script, _ = MODELS[model]
    steps = b.steps(model)
    cmd = [sys.executable, str(EXAMPLES / script), "--model", model, "--seed", str(seed), "--out", str(run_dir),
           "--no-progress", "--device", "cpu"]
    if data_dir is not None:
        cmd += ["--data-dir", data_dir]
    if b.smoke:
        cmd += ["--smoke"]
    else:
        every = max(1, steps // b.curve_points)  # sample grid + tangential spread; checkpoint
        cmd += ["--steps", str(steps), "--batch-size", str(b.batch_size), "--fid-samples", str(b.fid_samples),
                "--sample-every", str(every), "--ckpt-every", str(every), "--log-every", str(max(1, steps // 100))]
    if resume:
        cmd += ["--resume"]
    return cmd


def _checkpoint_step(run_dir: Path) -> int | None:
    path = run_dir / "checkpoint.pt"
    if not path.is_file():
        return None
    return int(torch.load(path, map_location="cpu", weights_only=False)["step"])


def _final_metrics(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "metrics.json"
    return json.loads(path.read_text())["final"] if path.is_file() else {}


def _expected_steps(model: str, b: Budget) -> int:
    if not b.smoke:
        return b.steps(model)
    return min(b.gan_steps, 4) if model in GAN_MODELS else min(b.vae_steps, 2)


def child_env(threads: int) -> dict[str, str]:
    """Environment of the example / evaluation subprocesses: ``threads`` intra-op threads each.
    (On a shared 2-core machine two threads per process collapse under contention: a Q-WGAN step
    measured 2.6 s with two threads against 0.78 s with one while other jobs ran.)"""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    return env


def _run_logged(cmd: list[str], log: Path, threads: int) -> tuple[int, float]:
    """Run ``cmd`` with its output appended to ``log``; returns ``(exit code, wall seconds)``.
    On Ctrl-C the child (same process group, so it got the SIGINT too) is waited for: the
    examples write a checkpoint before exiting."""
    t0 = time.perf_counter()
    with open(log, "a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=child_env(threads))
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            proc.wait()
            raise
    return code, time.perf_counter() - t0


def _tail(log: Path, n: int = 15) -> str:
    return "".join(log.read_text().splitlines(keepends=True)[-n:])


def train(model: str, seed: int, b: Budget, run_dir: Path, data_dir: str | None, threads: int = 1) -> float:
    """Train (or continue, or only FID-evaluate) one run through its example; returns the wall
    seconds this call spent (0 when the run was already complete)."""
    steps = _expected_steps(model, b)
    final = _final_metrics(run_dir)
    at = _checkpoint_step(run_dir)
    if at == steps and final.get("steps") == steps and "mnist_fid" in final \
            and (b.smoke or final.get("mnist_fid_samples") == b.fid_samples):
        return 0.0
    if at is not None and at > steps:
        raise SystemExit(f"error: {run_dir} holds a run trained for {at} steps, more than this study's {steps}; "
                         "use another --out for this budget")
    resume = at is not None
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = train_command(model, seed, b, run_dir, data_dir, resume)
    log = run_dir / "train.log"
    code, seconds = _run_logged(cmd, log, threads)
    if code != 0:
        raise RuntimeError(f"{model} seed {seed} training failed (exit {code}); log {log}:\n{_tail(log)}")
    _add_wall(run_dir, seconds)
    return seconds


def _add_wall(run_dir: Path, seconds: float) -> None:
    """Accumulate the example's wall time over resumed segments (run_dir/study_wall.json)."""
    path = run_dir / "study_wall.json"
    total = json.loads(path.read_text())["seconds"] if path.is_file() else 0.0
    atomic_write_text(json.dumps({"seconds": total + seconds}) + "\n", path)


# ----------------------------------------------------------------------------- evaluation
def load_generator(model: str, run_dir: Path) -> nn.Module:
    """The trained generator / decoder of a run, in eval mode."""
    ckpt = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    if model in GAN_MODELS:
        fam = make_family(model, None)
        fam.generator.load_state_dict(ckpt["modules"]["generator"])
        return fam.generator.eval()
    raise ValueError(f"load_generator: {model} is a VAE; use load_vae")


def load_vae(run_dir: Path) -> tuple[nn.Module, nn.Module]:
    """``(decoder QuotientModel, encoder)`` of a VAE run, in eval mode."""
    import qmm_plugin
    from qmm_plugin.paper.models import BetaVAEEncoder, beta_vae_decoder

    ckpt = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    q = qmm_plugin.convert(beta_vae_decoder(Z_DIM), num_biases=ckpt["settings"]["num_biases"])
    q.load_state_dict(ckpt["modules"]["decoder"])
    enc = BetaVAEEncoder(Z_DIM)
    enc.load_state_dict(ckpt["modules"]["encoder"])
    return q.eval(), enc.eval()


class LatentEncoder:
    """The GAN encoder of the disentanglement score: Eq. 3 on the trained manifolds, codes only
    (:func:`qmm_plugin.fit_codes`).

    Stage 1: each source image (untransformed) is fitted on every one of the A manifolds
    (generators) from one shared random start; the best manifold and its code are kept.
    Stage 2 (``__call__``, one transform): every transformed copy of source image n is fitted on
    image n's manifold, warm-started from its stage-1 code, so a code moves continuously with the
    transform strength.

    Why not ``q.invert(x).z`` (Eq. 3 with free biases): on this MNIST generator the free normal
    space of FC6272 (5,248 dimensions) exceeds the 784 pixels, so the biases alone reproduce the
    image and z stays near its random start (``qmm_plugin.inversion`` docstring;
    ``benchmarks/results/inversion.md``: z error ~1.04 at any step count); its codes would score
    the random starts, not the model. The same encoder is used for WGAN (A = 1), Q-WGAN (A = 10)
    and the DMWGAN-style bank (ten separate generators), so the comparison is like for like.
    """

    def __init__(self, forward: Callable[[Tensor, Tensor], Tensor], num_manifolds: int, z_dim: int,
                 sources: Tensor, strengths: int, steps: int, seed: int) -> None:
        self.forward, self.strengths, self.steps = forward, strengths, steps
        n, a = sources.shape[0], num_manifolds
        z0 = torch.randn(n, z_dim, generator=torch.Generator().manual_seed(seed)).repeat_interleave(a, 0)
        index = torch.arange(a).repeat(n)
        z, loss = fit_codes(forward, sources.repeat_interleave(a, 0), index, z_init=z0, steps=steps)
        pick = loss.view(n, a).argmin(1)
        self.z = z.view(n, a, z_dim)[torch.arange(n), pick]
        self.manifold = pick

    def __call__(self, x: Tensor) -> Tensor:
        n = self.z.shape[0]
        if x.shape[0] != n * self.strengths:
            raise ValueError(f"LatentEncoder expects all {n} x {self.strengths} transformed images in one call "
                             f"(disentanglement_score batch_size = num_images * strengths), got {x.shape[0]}")
        z0 = self.z.repeat_interleave(self.strengths, 0)
        index = self.manifold.repeat_interleave(self.strengths, 0)
        return fit_codes(self.forward, x, index, z_init=z0, steps=self.steps)[0]


def make_encoder(model: str, run_dir: Path, b: Budget, seed: int, sources: Tensor) -> Callable[[Tensor], Tensor]:
    """``encode(images in [-1, 1]) -> codes`` for the disentanglement score: the encoder mean for
    the VAEs, :class:`LatentEncoder` for the GANs."""
    if model in ("bvae", "qbvae", "qbvae-l0"):
        _, enc = load_vae(run_dir)
        return lambda x: enc(x)[0]
    g = load_generator(model, run_dir)
    for p in g.parameters():
        p.requires_grad_(False)
    if model == "dmwgan":
        forward, a, z_dim = (lambda z, i: g(z, i)), g.num_generators, g.z_dim
    else:
        forward, a, z_dim = (lambda z, i: g(z, manifold=i)), g.num_biases, g.model.z_dim
    return LatentEncoder(forward, a, z_dim, sources, b.dis_strengths, b.inversion_steps, seed)


def evaluate_disentanglement(model: str, run_dir: Path, b: Budget, data_dir: str | None, seed: int
                             ) -> dict[str, float]:
    """Appendix D scores for slant and width; one batched encoding per transform."""
    test, _ = load_mnist(data_dir, "test")
    images = to_model_range(test[:b.dis_images])
    encode = make_encoder(model, run_dir, b, seed, images)
    out: dict[str, float] = {}
    for transform in ("slant", "width"):
        out[f"dis_{transform}"] = disentanglement_score(
            encode, images, transform, num_images=b.dis_images, strengths=b.dis_strengths,
            batch_size=b.dis_images * b.dis_strengths)
    return out


# ----------------------------------------------------------------------------- the study
def read_results(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:  # a line cut by a kill: report, do not guess
                raise SystemExit(f"error: {path} line {i} is not valid JSON ({err}); delete that line and rerun "
                                 "(the run is re-evaluated from its checkpoint)") from err
    return rows


def append_result(path: Path, row: dict[str, Any]) -> None:
    """Append one JSON line (rewritten atomically, so a kill never leaves half a line)."""
    text = path.read_text() if path.is_file() else ""
    atomic_write_text(text + json.dumps(row, sort_keys=True) + "\n", path)


def _done(rows: list[dict[str, Any]], model: str, seed: int, b: Budget) -> bool:
    key = b.eval_key()
    return any(r["model"] == model and r["seed"] == seed and r["steps"] == _expected_steps(model, b)
               and all(r.get(k) == v for k, v in key.items()) for r in rows)


def run_one(model: str, seed: int, b: Budget, out: Path, data_dir: str | None, threads: int, tag: str
            ) -> dict[str, Any]:
    """Train (example subprocess) and evaluate (subprocess of this script: ``--evaluate-run``) one
    run; returns its results row. Raises RuntimeError (with the log's tail) when a step fails."""
    run_dir = out / f"{model}_s{seed}"
    print(f"{tag}: training {_expected_steps(model, b)} steps (log {run_dir / 'train.log'})", flush=True)
    sec = train(model, seed, b, run_dir, data_dir, threads)
    final = _final_metrics(run_dir)
    print(f"{tag}: trained ({sec:.0f} s this call); MNIST-FID {final['mnist_fid']:.2f}; disentanglement ...",
          flush=True)
    payload = json.dumps({"model": model, "seed": seed, "budget": asdict(b), "data_dir": data_dir})
    log = run_dir / "eval.log"
    code, eval_s = _run_logged([sys.executable, str(Path(__file__).resolve()), "--evaluate-run", str(run_dir),
                                "--payload", payload], log, threads)
    if code != 0:
        raise RuntimeError(f"{model} seed {seed} evaluation failed (exit {code}); log {log}:\n{_tail(log)}")
    dis = json.loads((run_dir / "disentanglement.json").read_text())
    rows = json.loads((run_dir / "metrics.json").read_text())["rows"]
    wall = json.loads((run_dir / "study_wall.json").read_text())["seconds"]
    print(f"{tag}: dis slant {dis['dis_slant']:.2f}, width {dis['dis_width']:.2f} ({eval_s:.0f} s)", flush=True)
    return {"model": model, "seed": seed, "preset": b.preset, "steps": _expected_steps(model, b),
            "batch_size": b.batch_size if not b.smoke else None, **b.eval_key(),
            "mnist_fid": final["mnist_fid"], "fid_test_images": final.get("mnist_fid_test_images"),
            "fid_real_train_vs_test": final.get("mnist_fid_real_train_vs_test"),
            "dis_slant": dis["dis_slant"], "dis_width": dis["dis_width"], "threads": threads,
            "sec_per_step": rows[-1].get("sec_per_step"), "example_wall_s": round(wall, 1),
            "dis_eval_s": round(eval_s, 1),
            "tangential_spread": {k.split("/", 1)[1]: v for k, v in final.items()
                                  if k.startswith("tangential_spread/")},
            "run_dir": str(run_dir), "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def evaluate_run_main(run_dir: Path, payload: str) -> int:
    """``--evaluate-run``: the disentanglement scores of one trained run, written atomically to
    ``run_dir/disentanglement.json`` (a subprocess, so that parallel jobs each get their threads)."""
    p = json.loads(payload)
    b = Budget(**p["budget"])
    dis = evaluate_disentanglement(p["model"], run_dir, b, p["data_dir"], p["seed"])
    atomic_write_text(json.dumps(dis) + "\n", run_dir / "disentanglement.json")
    return 0


def run_study(b: Budget, models: Sequence[str], out: Path, data_dir: str | None, jobs: int = 1,
              threads: int = 1) -> int:
    """Train and evaluate every (seed, model) not yet in ``out/results.jsonl``, ``jobs`` runs at a
    time; seed-major order (and :data:`PRIORITY` within a seed), so a stopped study has every
    model at its first seeds. Only this (main) thread appends to the results file."""
    from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    command = " ".join(["python benchmarks/reproduce_table1.py", *sys.argv[1:]])
    atomic_write_text(json.dumps({**asdict(b), "models": list(models), "data_dir": data_dir, "command": command},
                                 indent=1) + "\n", out / "study.json")
    order = [(seed, m) for seed in range(b.seeds) for m in sorted(models, key=PRIORITY.index)]
    todo = []
    for k, (seed, model) in enumerate(order, 1):
        tag = f"[{k}/{len(order)}] {model} seed {seed}"
        if _done(read_results(results), model, seed, b):
            print(f"{tag}: in {results.name}, skipped", flush=True)
        else:
            todo.append((tag, seed, model))
    failures: list[str] = []
    t_study = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=jobs)
    running: dict[Future[dict[str, Any]], str] = {}
    try:
        for tag, seed, model in todo:
            running[pool.submit(run_one, model, seed, b, out, data_dir, threads, tag)] = tag
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                tag = running.pop(fut)
                try:
                    append_result(results, fut.result())
                    print(f"{tag}: appended to {results}; study so far {(time.perf_counter() - t_study) / 60:.1f} "
                          "min", flush=True)
                except RuntimeError as err:
                    print(f"{tag}: FAILED: {err}", file=sys.stderr, flush=True)
                    failures.append(tag)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if failures:
        print(f"{len(failures)} run(s) failed: {', '.join(failures)}; rerun the same command to retry them",
              file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------------- plots
_COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def plot_log_curves(series: list[tuple[str, list[float], list[float], tuple[int, int, int], bool]], path: Path,
                    title: str, xlabel: str, ylabel: str, size: tuple[int, int] = (760, 460)) -> Path:
    """A line plot with a log10 y axis, drawn with Pillow (no plotting library needed).

    ``series``: ``(label, xs, ys, rgb, dashed)``; non-positive ys are dropped (log scale).
    """
    from PIL import Image, ImageDraw, ImageFont

    w, h = size
    left, right, top, bottom = 80, 200, 36, 50
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=13)
    pts = [(x, y) for _, xs, ys, _, _ in series for x, y in zip(xs, ys) if y > 0 and math.isfinite(y)]
    if not pts:
        raise ValueError(f"plot_log_curves: nothing positive to plot for {path.name}")
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    lo = math.floor(math.log10(min(p[1] for p in pts)))
    hi = math.ceil(math.log10(max(p[1] for p in pts)))
    hi = max(hi, lo + 1)
    x1 = x1 if x1 > x0 else x0 + 1

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (w - left - right),
                top + (hi - math.log10(y)) / (hi - lo) * (h - top - bottom))

    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    for e in range(lo, hi + 1):
        _, yy = px(x0, 10.0 ** e)
        draw.line([left, yy, w - right, yy], fill=(225, 225, 225))
        draw.text((left - 8, yy), f"1e{e}", fill="black", font=font, anchor="rm")
    for i in range(6):
        x = x0 + (x1 - x0) * i / 5
        xx, _ = px(x, 10.0 ** hi)
        draw.line([xx, h - bottom, xx, h - bottom + 4], fill="black")
        draw.text((xx, h - bottom + 6), f"{x:g}", fill="black", font=font, anchor="mt")
    draw.text((left, 2), title, fill="black", font=font)
    draw.text((left + (w - left - right) / 2, h - 18), xlabel, fill="black", font=font, anchor="mt")
    draw.text((8, top - 16), ylabel, fill="black", font=font)
    for k, (label, xs, ys, rgb, dashed) in enumerate(series):
        line = [px(x, y) for x, y in zip(xs, ys) if y > 0 and math.isfinite(y)]
        for p, q in zip(line, line[1:]):
            if not dashed:
                draw.line([p, q], fill=rgb, width=2)
                continue
            length = math.hypot(q[0] - p[0], q[1] - p[1])
            for t0 in range(0, max(int(length), 1), 12):  # 7 px dash, 5 px gap
                a, c = t0 / max(length, 1e-9), min(t0 + 7, length) / max(length, 1e-9)
                draw.line([(p[0] + a * (q[0] - p[0]), p[1] + a * (q[1] - p[1])),
                           (p[0] + c * (q[0] - p[0]), p[1] + c * (q[1] - p[1]))], fill=rgb, width=2)
        for p in line:
            draw.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=rgb)
        ly = top + 8 + 18 * k
        lx = w - right + 10
        draw.line([lx, ly, lx + 24, ly], fill=rgb, width=2)
        if dashed:
            draw.line([lx + 7, ly, lx + 12, ly], fill="white", width=2)
            draw.line([lx + 19, ly, lx + 24, ly], fill="white", width=2)
        draw.text((lx + 30, ly), label, fill="black", font=font, anchor="lm")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def spread_curves(out: Path, models: Sequence[str], runs: set[tuple[str, int]]
                  ) -> dict[str, dict[str, list[list[float]]]]:
    """``{model: {layer: [[step, geometric mean over seeds of tr cov(a_par)], ...]}}`` from the
    ``metrics.json`` of the finished ``runs`` ((model, seed) pairs in the results file; a run still
    training is left out) — the tangential spread logged at every sample grid."""
    curves: dict[str, dict[str, list[list[float]]]] = {}
    for model in models:
        per_layer: dict[str, dict[int, list[float]]] = {}
        for seed in sorted(s for m, s in runs if m == model):
            path = out / f"{model}_s{seed}" / "metrics.json"
            if not path.is_file():
                continue
            for row in json.loads(path.read_text())["rows"]:
                for key, v in row.items():
                    if key.startswith("tangential_spread/") and isinstance(v, (int, float)) and v > 0:
                        per_layer.setdefault(key.split("/", 1)[1], {}).setdefault(int(row["step"]), []).append(v)
        if per_layer:
            curves[model] = {layer: [[s, math.exp(statistics.fmean(math.log(v) for v in vs))]
                                     for s, vs in sorted(pts.items())] for layer, pts in per_layer.items()}
    return curves


# ------------------------------------------------------------------------ generalisation
def generalisation_grids(run_dir: Path, model: str, dest: Path, data_dir: str | None, steps: int, tag: str,
                         images: int = 6) -> list[Path]:
    """Fig. 5/6 from a trained run: ``examples/generalize.py`` (Eq. 3 with free biases on digits
    with a noise rectangle, coloured digits and rendered letters; derived-manifold samples), its
    PNGs copied to ``dest/generalize_{kind}_{model}_{tag}.png``."""
    work = run_dir / "generalize"
    ckpt = run_dir / "checkpoint.pt"
    done = sorted(work.glob("generalize_*.png"))
    if done and all(png.stat().st_mtime > ckpt.stat().st_mtime for png in done):  # already drawn from this checkpoint
        return _copy_grids(done, dest, model, tag)
    cmd = [sys.executable, str(EXAMPLES / "generalize.py"), "--checkpoint", str(run_dir / "checkpoint.pt"),
           "--inv-steps", str(steps), "--images", str(images), "--out", str(work), "--device", "cpu"]
    if data_dir is not None:
        cmd += ["--data-dir", data_dir]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"generalize.py failed on {run_dir} (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return _copy_grids(sorted(work.glob("generalize_*.png")), dest, model, tag)


def _copy_grids(pngs: list[Path], dest: Path, model: str, tag: str) -> list[Path]:
    paths = []
    for png in pngs:
        target = dest / f"{png.stem}_{model}_{tag}.png"
        shutil.copyfile(png, target)
        paths.append(target)
    return paths


# ------------------------------------------------------------------------ manifold structure
@torch.no_grad()
def manifold_structure(model: str, run_dir: Path, n: int = 64, seed: int = 0) -> dict[str, Any] | None:
    """How distinct a trained run's manifolds are (from its checkpoint; ``None`` for A = 1).

    * ``bias_spread``: per converted layer, the *total* spread tr cov_i(a^(i)) of the bias bank
      (tangential + normal parts; compare with the tangential spread);
    * ``diversity``: for the same codes z, the mean pixel distance between the images of two
      different manifolds, divided by the mean distance between two different codes on one
      manifold (0: every manifold draws the same image, as when the banks never separated).
    """
    if model in ("wgan", "bvae"):
        return None
    if model in ("bvae", "qbvae", "qbvae-l0"):
        q, _ = load_vae(run_dir)
        forward = lambda z, i: torch.sigmoid(q(z, manifold=i)) * 2 - 1  # noqa: E731 (Bernoulli mean)
        a, z_dim, bank_model = q.num_biases, q.model.z_dim, q
    elif model == "dmwgan":
        g = load_generator(model, run_dir)
        forward, a, z_dim, bank_model = (lambda z, i: g(z, i)), g.num_generators, g.z_dim, None
    else:
        g = load_generator(model, run_dir)
        forward, a, z_dim, bank_model = (lambda z, i: g(z, manifold=i)), g.num_biases, g.model.z_dim, g
    z = torch.randn(n, z_dim, generator=torch.Generator().manual_seed(seed))
    imgs = torch.stack([forward(z, torch.full((n,), i, dtype=torch.long)) for i in range(a)]).flatten(2)
    between = torch.stack([(imgs[i] - imgs[j]).norm(dim=1).mean() for i in range(a) for j in range(i + 1, a)]).mean()
    within = (imgs - imgs.roll(1, dims=1)).norm(dim=2).mean()
    out: dict[str, Any] = {"diversity": float(between / within)}
    if bank_model is not None:
        out["bias_spread"] = {p: float(m.bias_bank.detach().double().var(0).sum())
                              for p, m in bank_model.multi_bias_layers().items()}
    return out


# ---------------------------------------------------------------------------------- report
def _stats(values: list[float]) -> tuple[float, float | None, int]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return math.nan, None, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None), len(vals)


def _fmt(values: list[float], digits: int = 2) -> str:
    mean, std, n = _stats(values)
    if n == 0:
        return "—"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def summarize(rows: list[dict[str, Any]], models: Sequence[str]) -> list[dict[str, Any]]:
    """One summary row per model: mean/std/n of every metric (the numbers the tables print)."""
    table = []
    for m in models:
        rs = [r for r in rows if r["model"] == m]
        if not rs:
            continue
        entry: dict[str, Any] = {"model": m, "n": len(rs), "seeds": sorted(r["seed"] for r in rs),
                                 "steps": sorted({r["steps"] for r in rs}), "batch_size": rs[0]["batch_size"]}
        for key in ("mnist_fid", "dis_slant", "dis_width", "sec_per_step", "example_wall_s", "dis_eval_s",
                    "fid_real_train_vs_test"):
            mean, std, n = _stats([r.get(key) for r in rs])
            entry[key] = {"mean": mean, "std": std, "n": n}
        table.append(entry)
    return table


def render_tables(rows: list[dict[str, Any]], b: Budget, models: Sequence[str], out: Path,
                  assets: dict[str, str], command: str,
                  structure: dict[str, list[dict[str, Any]]] | None = None) -> str:
    """The generated markdown block: budget, Table 1 beside the paper, plots, commands."""
    n_seeds = sorted({r["seed"] for r in rows})
    per_model = {m: [r for r in rows if r["model"] == m] for m in models}
    complete = all(len(per_model[m]) == b.seeds for m in models)
    lines = [f"Preset **{b.preset}** — {len(rows)} of {b.seeds * len(models)} runs finished"
             + ("" if complete else " (**partial**: n = seeds finished per cell)") + f"; results file "
             f"`{assets['results']}`. Command: `{command}`.", ""]
    lines += ["| model | steps × batch | n | s/step (this machine) | example wall (train + FID) | "
              "disentanglement eval |", "|---|---|---|---|---|---|"]
    for m in models:
        rs = per_model[m]
        if not rs:
            lines.append(f"| {MODELS[m][1]} | {b.steps(m)} × {b.batch_size} | 0 | — | — | — |")
            continue
        lines.append(f"| {MODELS[m][1]} | {rs[0]['steps']} × {rs[0]['batch_size']} | {len(rs)} | "
                     f"{_fmt([r['sec_per_step'] for r in rs], 3)} | {_fmt([r['example_wall_s'] for r in rs], 0)} s | "
                     f"{_fmt([r['dis_eval_s'] for r in rs], 0)} s |")
    fid_imgs = sorted({r.get("fid_test_images") for r in rows} - {None})
    ref = [r["fid_real_train_vs_test"] for r in rows if r.get("fid_real_train_vs_test") is not None]
    total = sum(r["example_wall_s"] + r["dis_eval_s"] for r in rows) / 3600
    lines += ["", f"Sum over runs of (example wall + disentanglement evaluation): {total:.2f} h "
              "(runs overlap with `--jobs 2`, so the study's elapsed time is shorter).", ""]
    lines += [f"MNIST-FID: {b.fid_samples} generated images vs {', '.join(map(str, fid_imgs))} test digits"
              + (f" (for scale, {b.fid_samples} real training digits score {ref[0]:.2f})" if ref else "")
              + ". Disentanglement: "
              f"{b.dis_images} test digits × {b.dis_strengths} strengths; GAN encoder: latent-only fit on "
              f"the trained manifolds, {b.inversion_steps} Adam steps per stage. Seeds: {', '.join(map(str, n_seeds))}.", "",
              "| model | MNIST-FID (ours) | FID (paper) | Dis. slant (ours) | (paper) | Dis. width (ours) | (paper) |",
              "|---|---|---|---|---|---|---|"]
    for m in models:
        rs = per_model[m]
        p = PAPER_TABLE1[m]
        pf = {k: f"{v[0]:.2f} ± {v[1]:.2f}" for k, v in p.items()}
        n = f" (n={len(rs)})" if rs and len(rs) != b.seeds else ""
        lines.append(f"| {MODELS[m][1]}{n} | {_fmt([r['mnist_fid'] for r in rs])} | {pf['fid']} | "
                     f"{_fmt([r['dis_slant'] for r in rs])} | {pf['slant']} | "
                     f"{_fmt([r['dis_width'] for r in rs])} | {pf['width']} |")
    lines.append("")
    structure = structure or {}

    def gmean(values: list[float]) -> float:
        return math.exp(statistics.fmean(math.log(max(v, 1e-300)) for v in values))

    if any(r["tangential_spread"] for r in rows) or structure:
        lines += ["Bias banks and manifolds at the end of training (geometric mean over seeds for the spreads, "
                  "mean ± std for the diversity). Tangential spread tr cov(a_par) is what R_BA drives down; the "
                  "total spread tr cov(a) includes the normal parts that make the manifolds differ; diversity = "
                  "pixel distance between two manifolds' images of the same z over the distance between two "
                  "codes on one manifold (0: all manifolds draw the same image).", "",
                  "| model | tangential spread per layer | total bias spread per layer | manifold diversity |",
                  "|---|---|---|---|"]
        for m in models:
            rs = [r for r in per_model[m] if r["tangential_spread"]]
            st = structure.get(m, [])
            if not rs and not st:
                continue
            tang = ", ".join(f"{k}: {gmean([r['tangential_spread'][k] for r in rs]):.3g}"
                             for k in sorted(rs[0]["tangential_spread"])) if rs else "—"
            banks = [x["bias_spread"] for x in st if "bias_spread" in x]
            total = ", ".join(f"{k}: {gmean([x[k] for x in banks]):.3g}" for k in sorted(banks[0])) if banks else "—"
            div = _fmt([x["diversity"] for x in st], 3) if st else "—"
            lines.append(f"| {MODELS[m][1]} | {tang} | {total} | {div} |")
        lines.append("")
    for key, alt in (("spread_gan", "tangential spread, Q-WGAN vs λ=0"),
                     ("spread_vae", "tangential spread, Q-β-VAE vs λ=0")):
        if key in assets:
            lines += [f"![{alt}]({assets[key]})", ""]
    gen_models = [m for m in ("qwgan", "qwgan-l0") if any(k.startswith("generalize_") and f"_{m}_" in k
                                                          for k in assets)]
    if gen_models:
        lines += ["Generalisation (Fig. 5/6; seed 0; rows: input | reconstruction | derived-manifold samples):", "",
                  "| input | " + " | ".join(MODELS[m][1] for m in gen_models) + " |",
                  "|---|" + "---|" * len(gen_models)]
        for kind in ("noise", "colour", "letters"):
            cells = [f"![{kind} {m}]({assets[k]})" if (k := f"generalize_{kind}_{m}_{b.preset}") in assets else "—"
                     for m in gen_models]
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
        lines.append("")
    sample_keys = [m for m in models if f"samples_{m}" in assets]
    if sample_keys:
        lines += ["Final sample grids, seed 0 (rows: manifolds / generators, columns: shared latents):", "",
                  "| " + " | ".join(MODELS[m][1] for m in sample_keys) + " |", "|" + "---|" * len(sample_keys),
                  "| " + " | ".join(f"![{m}]({assets[f'samples_{m}']})" for m in sample_keys) + " |", ""]
    return "\n".join(lines).rstrip() + "\n"


def replace_block(doc: str, name: str, body: str) -> str:
    """Replace the text between ``<!-- BEGIN generated:NAME -->`` and ``<!-- END generated:NAME -->``
    (appended at the end when the markers are absent)."""
    begin, end = f"<!-- BEGIN generated:{name} -->", f"<!-- END generated:{name} -->"
    block = f"{begin}\n<!-- written by benchmarks/reproduce_table1.py --report; edits here are overwritten -->\n" \
            f"{body}{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(doc):
        return pattern.sub(lambda _: block, doc)
    return doc.rstrip() + "\n\n" + block + "\n"


def report(b: Budget, models: Sequence[str], out: Path, data_dir: str | None, doc: Path, assets_dir: Path,
           command: str, grids: bool = True) -> Path:
    """Plots, generalisation grids, results copies and the generated block of ``doc``."""
    rows = [r for r in read_results(out / "results.jsonl") if r["model"] in models]
    if not rows:
        raise SystemExit(f"error: no results in {out / 'results.jsonl'}; run the study first (same --out/preset)")
    assets_dir.mkdir(parents=True, exist_ok=True)

    def rel(p: Path) -> str:
        return os.path.relpath(p, doc.parent)

    tag = b.preset
    shutil.copyfile(out / "results.jsonl", assets_dir / f"results_{tag}.jsonl")
    assets = {"results": rel(assets_dir / f"results_{tag}.jsonl")}
    summary = summarize(rows, models)
    atomic_write_text(json.dumps({"budget": asdict(b), "summary": summary, "paper": PAPER_TABLE1}, indent=1) + "\n",
                      assets_dir / f"summary_{tag}.json")
    curves = spread_curves(out, [m for m in models if m in ("qwgan", "qwgan-l0", "qbvae", "qbvae-l0")],
                           {(r["model"], r["seed"]) for r in rows})
    atomic_write_text(json.dumps(curves, indent=1) + "\n", assets_dir / f"spread_curves_{tag}.json")
    for key, pair, title in (("spread_gan", ("qwgan", "qwgan-l0"), "Q-WGAN (lambda=0.05, solid) vs lambda=0 (dashed)"),
                             ("spread_vae", ("qbvae", "qbvae-l0"), "Q-beta-VAE (lambda=1, solid) vs lambda=0 (dashed)")):
        series = []
        for j, m in enumerate(pair):
            for k, (layer, pts) in enumerate(sorted(curves.get(m, {}).items())):
                series.append((f"{m} {layer}", [p[0] for p in pts], [p[1] for p in pts],
                               _COLORS[k % len(_COLORS)], j == 1))
        if series:
            path = plot_log_curves(series, assets_dir / f"{key}_{tag}.png",
                                   f"tangential spread tr cov(a_par) over training ({title})", "training step",
                                   "tr cov(a_par)")
            assets[key] = rel(path)
    for m in ("qwgan", "qwgan-l0"):
        run_dir = out / f"{m}_s0"
        if grids and any(r["model"] == m and r["seed"] == 0 for r in rows):  # a finished run only
            for p in generalisation_grids(run_dir, m, assets_dir, data_dir, b.grid_inversion_steps, tag,
                                          images=2 if b.smoke else 6):
                assets[p.stem] = rel(p)
    for m in models:
        run_dir = out / f"{m}_s0"
        if not any(r["model"] == m and r["seed"] == 0 for r in rows):
            continue
        grids_png = sorted(run_dir.glob("samples_step*.png"), key=lambda p: int(re.sub(r"\D", "", p.stem)))
        if grids_png:
            dest = assets_dir / f"samples_{m}_{tag}.png"
            shutil.copyfile(grids_png[-1], dest)
            assets[f"samples_{m}"] = rel(dest)
    structure: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        st = manifold_structure(r["model"], out / f"{r['model']}_s{r['seed']}")
        if st is not None:
            structure.setdefault(r["model"], []).append(st)
    atomic_write_text(json.dumps(structure, indent=1) + "\n", assets_dir / f"manifold_structure_{tag}.json")
    text = doc.read_text() if doc.is_file() else "# Results\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(replace_block(text, tag, render_tables(rows, b, models, out, assets, command, structure)),
                      doc)
    return doc


# ------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="the quick preset (about 10 minutes on 2 cores)")
    g.add_argument("--smoke", action="store_true", help="a few steps per run (tests; seconds per run)")
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma-separated subset of {','.join(MODELS)} (default: all)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds 0..N-1 (default: the preset's)")
    p.add_argument("--gan-steps", type=int, default=None, help="override the preset's GAN steps")
    p.add_argument("--vae-steps", type=int, default=None, help="override the preset's VAE steps")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA),
                   help=f"folder with the four MNIST idx files (default: {DEFAULT_DATA}); 'embedded' = the "
                        "10k/2k subset inside qmm_plugin (for tests)")
    p.add_argument("--out", default=None, help="study folder (default: runs/table1/<preset>)")
    p.add_argument("--jobs", type=int, default=2, help="runs trained/evaluated at the same time (default: 2)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of each run's subprocesses (default: 1; see child_env)")
    p.add_argument("--evaluate-run", default=None, help=argparse.SUPPRESS)  # internal: one run's evaluation
    p.add_argument("--payload", default=None, help=argparse.SUPPRESS)
    p.add_argument("--report", action="store_true",
                   help="after the study (or instead, with --report-only): plots, grids and the generated "
                        "block of --doc")
    p.add_argument("--report-only", action="store_true", help="only write the report from existing results")
    p.add_argument("--no-grids", action="store_true", help="report without the generalisation grids")
    p.add_argument("--doc", default=str(DOCS / "RESULTS.md"), help="markdown file whose block is rewritten")
    p.add_argument("--assets", default=str(DOCS / "results"), help="folder for plots and results copies")
    args = p.parse_args(argv)
    if args.jobs < 1 or args.threads < 1:
        p.error("--jobs and --threads must be >= 1")
    preset = "quick" if args.quick else "smoke" if args.smoke else "full"
    b = PRESETS[preset]
    for name in ("seeds", "gan_steps", "vae_steps"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
            b = replace(b, **{name: value})
    args.budget = b
    args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.model_list if m not in MODELS]
    if unknown or not args.model_list:
        p.error(f"--models: unknown {unknown}; choose from {','.join(MODELS)}")
    if args.data_dir == "embedded":
        args.data_dir = None
    elif not Path(args.data_dir).is_dir():
        p.error(f"--data-dir {args.data_dir} does not exist; pass the folder with the MNIST idx files, or "
                "--data-dir embedded for the small subset inside qmm_plugin")
    args.out = Path(args.out) if args.out else REPO / "runs" / "table1" / preset
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.evaluate_run is not None:
        return evaluate_run_main(Path(args.evaluate_run), args.payload)
    b = args.budget
    print(f"study {b.preset}: {b.seeds} seed(s) × {len(args.model_list)} models; GAN {b.gan_steps} steps, VAE "
          f"{b.vae_steps} steps, batch {b.batch_size}; out {args.out}; {args.jobs} job(s) × {args.threads} thread(s); "
          f"no GPU used (--device cpu)", flush=True)
    code = 0
    if not args.report_only:
        try:
            code = run_study(b, args.model_list, args.out, args.data_dir, args.jobs, args.threads)
        except KeyboardInterrupt:
            print("\nstopped; rerun the same command to continue where it stopped", file=sys.stderr)
            return 130
    if args.report or args.report_only:
        study = args.out / "study.json"
        cmd = json.loads(study.read_text())["command"].strip() if study.is_file() else "?"
        doc = report(b, args.model_list, args.out, args.data_dir, Path(args.doc), Path(args.assets), cmd,
                     grids=not args.no_grids)
        print(f"report: {doc}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
