"""Evaluating a trained run from its checkpoint: the disentanglement scores (Appendix D), the
manifold structure, the Fig. 5/6 generalisation grids."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qmm_plugin import fit_codes
from qmm_plugin.io import atomic_write_text
from qmm_plugin.paper.data import load_mnist, to_model_range
from qmm_plugin.paper.gan_families import make_family
from qmm_plugin.paper.metrics import disentanglement_score
from qmm_plugin.paper.training import sampled_generator_state
from qmm_plugin.paper.vae_em import Z_DIM
from qmm_plugin.regularizer import tangential_spread

from .config import Budget, EXAMPLES, GAN_MODELS, REPO


def load_generator(model: str, run_dir: Path) -> nn.Module:
    """The trained generator of a GAN run, in eval mode: the weights its samples come from (the
    moving average of G for a run of the main example's recipe)."""
    ckpt = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    if model in GAN_MODELS:
        fam = make_family(model, None)
        fam.generator.load_state_dict(sampled_generator_state(ckpt))
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


def evaluate_run_main(run_dir: Path, payload: str) -> int:
    """``--evaluate-run``: the disentanglement scores of one trained run, written atomically to
    ``run_dir/disentanglement.json`` (a subprocess, so that parallel jobs each get their threads)."""
    p = json.loads(payload)
    b = Budget(**p["budget"])
    dis = evaluate_disentanglement(p["model"], run_dir, b, p["data_dir"], p["seed"])
    atomic_write_text(json.dumps(dis) + "\n", run_dir / "disentanglement.json")
    return 0


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


@torch.no_grad()
def manifold_structure(model: str, run_dir: Path, n: int = 64, seed: int = 0) -> dict[str, Any] | None:
    """How distinct a trained run's manifolds are (from its checkpoint; ``None`` for A = 1).

    * ``tangential_spread``: per converted layer, the exact tr cov_i(a_par^(i)) of the trained
      bank (:func:`qmm_plugin.regularizer.tangential_spread`; what R_BA drives down);
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
        layers = bank_model.multi_bias_layers()
        out["tangential_spread"] = tangential_spread(layers)
        out["bias_spread"] = {p: float(m.bias_bank.detach().double().var(0).sum()) for p, m in layers.items()}
    return out
