#!/usr/bin/env python
r"""Which training recipe makes Q-WGAN's manifolds separate into digit classes on a CPU budget?

Each *cell* is one recipe (a set of overrides of :class:`Recipe`), trained for ``steps`` generator
steps with ``--seeds`` seeds; every ``--eval-every`` steps the manifold-class report
(:mod:`qmm_plugin.paper.manifold_classes`: NMI, purity, distinct majority classes, confident share,
coverage, within-manifold diversity) is taken on 100 samples per manifold with the bundled MNIST
classifier. Results append to ``--out/results.jsonl`` one line per evaluation; a cell-seed whose
final line is there is skipped, so an interrupted study resumes where it stopped (a cell in
progress restarts from its last atomic checkpoint in ``--out/ckpt``). ``--report`` writes
``--out/ABLATION.md`` (tables and NMI-vs-steps curves) from the results file alone.

Recipe choices the paper fixes (shared weights, bias banks, R_BA, uniform manifold prior) are kept
in every cell; what varies is what it leaves open, plus one extension of ours: ``info``, the
weight of a *manifold-recovery* term (a linear head on the critic's last hidden features predicts
the manifold index of a fake; its cross-entropy trains the head and the generator, as InfoGAN's
categorical code and DMWGAN's generator-index posterior do).

    python benchmarks/separation_ablation.py --cells main --seeds 2          # run (resumable)
    python benchmarks/separation_ablation.py --report                        # tables + curves
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import qmm_plugin
from qmm_plugin.paper.manifold_classes import sample_manifold_class_report

from qmm_plugin.paper.data import load_mnist, to_model_range
from qmm_plugin.paper.metrics import load_mnist_classifier
from qmm_plugin.paper.models import MNISTCritic, MNISTGenerator
from qmm_plugin.paper.viz import save_line_plot

A = 10


@dataclass(frozen=True)
class Recipe:
    """Everything a cell may change. Defaults: Appendix B's Q-WGAN (Adam β1 0.9, Wasserstein loss,
    one critic step, λ = 0.05, z = 8) at batch 32 on the embedded 10k-digit subset."""

    loss: str = "wasserstein"      # wasserstein | hinge | ns (non-saturating GAN loss)
    beta1: float = 0.9
    lr: float = 2e-4
    n_critic: int = 1
    lam: float = 0.05
    init_std: float | None = None  # bank spread (None: convert's default)
    bank_lr: float = 1.0           # learning-rate multiplier of the bias banks
    g_lr: float = 1.0              # learning-rate multiplier of the generator (InfoGAN: 5)
    stratified: bool = False       # every batch holds each manifold equally often
    z_dim: int = 8
    data: str = "subset"           # subset | full
    batch: int = 32
    steps: int = 1600
    info: float = 0.0              # weight of the manifold-recovery term (ours)
    cluster: float = 0.0           # weight of the recovery head's real-data clustering term (ours)
    ema: float = 0.0               # decay of an exponential moving average of G evaluated instead of G (0: none)
    num_biases: int = A


PAPER = Recipe()
OURS = Recipe(loss="hinge", beta1=0.5, info=1.0, stratified=True)
MAIN_JOB = replace(OURS, g_lr=5.0, ema=0.995)  # examples/mnist_qwgan.py's default preset, at batch 32

CELLS: dict[str, Recipe] = {
    "paper": PAPER,
    "beta1=0.5": replace(PAPER, beta1=0.5),
    "beta1=0.5,hinge": replace(PAPER, beta1=0.5, loss="hinge"),
    "beta1=0.5,info=1": replace(PAPER, beta1=0.5, info=1.0),
    "ours": OURS,
    "ours,lam=0": replace(OURS, lam=0.0),
    "ours,info=0": replace(OURS, info=0.0),
    "ours,ns": replace(OURS, loss="ns"),
    "ours,wasserstein": replace(OURS, loss="wasserstein"),
    "ours,n_critic=2": replace(OURS, n_critic=2),
    "ours,init_std=0.3": replace(OURS, init_std=0.3),
    "ours,bank_lr=10": replace(OURS, bank_lr=10.0),
    "ours,bank_lr=30": replace(OURS, bank_lr=30.0),
    "ours,bank_lr=10,init_std=0.3": replace(OURS, bank_lr=10.0, init_std=0.3),
    "ours,unstratified": replace(OURS, stratified=False),
    "ours,z=16": replace(OURS, z_dim=16),
    "ours,full": replace(OURS, data="full"),
    "ours,batch=64": replace(OURS, batch=64),
    "ours,info=0.3": replace(OURS, info=0.3),
    "ours,info=3": replace(OURS, info=3.0),
    "ours,lr=5e-4": replace(OURS, lr=5e-4),
    "ours,g_lr=5": replace(OURS, g_lr=5.0),
    "ours,g_lr=5,cluster=1": replace(OURS, g_lr=5.0, cluster=1.0),
    "ours,cluster=1": replace(OURS, cluster=1.0),
    "ours,g_lr=5,ema=0.995": MAIN_JOB,
    "ours,g_lr=5,ema=0.995,lam=0": replace(MAIN_JOB, lam=0.0),
    "ours,g_lr=5,ema=0.995,info=0": replace(MAIN_JOB, info=0.0),
    "ours,g_lr=2.5,bank_lr=10": replace(OURS, g_lr=2.5, bank_lr=10.0),
    "ours,wgan(A=1)": replace(OURS, num_biases=1, info=0.0, lam=0.0),
}
GROUPS = {
    "main": ["paper", "beta1=0.5", "ours", "ours,lam=0", "ours,info=0"],
    "loss": ["beta1=0.5,hinge", "ours,ns", "ours,wasserstein", "ours,n_critic=2"],
    "banks": ["ours,init_std=0.3", "ours,bank_lr=10", "ours,bank_lr=30", "ours,bank_lr=10,init_std=0.3",
              "ours,unstratified"],
    "recipe": ["ours,g_lr=5", "ours,g_lr=5,ema=0.995", "ours,g_lr=5,ema=0.995,lam=0",
               "ours,g_lr=5,ema=0.995,info=0"],
    "size": ["ours,z=16", "ours,full", "ours,batch=64", "ours,info=0.3", "beta1=0.5,info=1", "ours,wgan(A=1)"],
}


def d_loss(kind: str, real: Tensor, fake: Tensor) -> Tensor:
    if kind == "wasserstein":
        return fake.mean() - real.mean()
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    if kind == "ns":
        return F.softplus(-real).mean() + F.softplus(fake).mean()
    raise ValueError(f"unknown loss {kind!r}; choose wasserstein, hinge or ns")


def g_loss(kind: str, fake: Tensor) -> Tensor:
    return F.softplus(-fake).mean() if kind == "ns" else -fake.mean()


def load_digits(data: str) -> Tensor:
    data_dir = None if data == "subset" else os.environ.get("MNIST_DIR", "../shared/datasets/mnist")
    x, _ = load_mnist(data_dir, "train")
    return to_model_range(x).reshape(-1, 1, 28, 28)


def build(r: Recipe) -> tuple[nn.Module, nn.Module, nn.Module, torch.optim.Optimizer, torch.optim.Optimizer]:
    q = qmm_plugin.convert(MNISTGenerator(z_dim=r.z_dim), num_biases=r.num_biases, init_std=r.init_std)
    critic = MNISTCritic(spectral_norm=True, batchnorm=False)
    head = nn.Linear(critic.config.fc[-1], r.num_biases)
    banks = [p for n, p in q.named_parameters() if n.endswith("bias_bank")]
    rest = [p for n, p in q.named_parameters() if not n.endswith("bias_bank")]
    betas = (r.beta1, 0.999)
    g_lr = r.lr * r.g_lr
    opt_g = torch.optim.Adam([{"params": rest}, {"params": banks, "lr": g_lr * r.bank_lr}], lr=g_lr, betas=betas)
    opt_d = torch.optim.Adam(list(critic.parameters()) + list(head.parameters()), lr=r.lr, betas=betas)
    return q, critic, head, opt_g, opt_d


def manifolds(r: Recipe, n: int) -> Tensor:
    if r.stratified:
        return torch.randperm(n) % r.num_biases
    return torch.randint(0, r.num_biases, (n,))


def train_step(r: Recipe, q: nn.Module, critic: nn.Module, head: nn.Module, opt_g: torch.optim.Optimizer,
               opt_d: torch.optim.Optimizer, data: Tensor) -> dict[str, float]:
    """One generator step after ``n_critic`` critic steps; the last critic step and the generator
    step share one fake batch (as pytorch/examples' DCGAN), real and fake go through the critic
    (no BatchNorm) as one batch."""
    idx = manifolds(r, r.batch)
    z = torch.randn(r.batch, r.z_dim)
    if r.lam > 0:
        fake, reg = q(z, manifold=idx, return_regularizer=True)
    else:
        fake, reg = q(z, manifold=idx), torch.zeros(())
    for k in range(r.n_critic):
        real = data[torch.randint(0, data.shape[0], (r.batch,))]
        idx_d = idx if k == r.n_critic - 1 else manifolds(r, r.batch)
        if k == r.n_critic - 1:
            fake_d = fake.detach()
        else:
            with torch.no_grad():
                fake_d = q(torch.randn(r.batch, r.z_dim), manifold=idx_d)
        feats = critic.features(torch.cat([real, fake_d]))
        scores = critic.head(feats).reshape(-1)
        loss_d = d_loss(r.loss, scores[:r.batch], scores[r.batch:])
        if r.info > 0:
            loss_d = loss_d + r.info * F.cross_entropy(head(feats[r.batch:]), idx_d)
        if r.cluster > 0:  # real digits: confident and balanced predictions of the recovery head
            loss_d = loss_d - r.cluster * cluster_information(head(feats[:r.batch]))
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
    critic.requires_grad_(False)
    feats = critic.features(fake)
    loss_g = g_loss(r.loss, critic.head(feats).reshape(-1)) + r.lam * reg
    info = F.cross_entropy(head(feats), idx) if r.info > 0 else torch.zeros(())
    loss_g = loss_g + r.info * info
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    opt_g.step()
    critic.requires_grad_(True)
    return {k: float(v.detach()) for k, v in (("loss_d", loss_d), ("loss_g", loss_g), ("r_ba", reg), ("info", info))}


def cluster_information(logits: Tensor) -> Tensor:
    """Mutual information between a batch's samples and the head's predicted index,
    H(mean p) - mean H(p) (as CatGAN / IMSAT): high when each sample is assigned confidently and
    the assignments are balanced over the A indices."""
    p = logits.softmax(-1)
    logp = logits.log_softmax(-1)
    marginal = p.mean(0)
    return -(marginal * marginal.clamp_min(1e-12).log()).sum() + (p * logp).sum(-1).mean()


def evaluate(q: nn.Module, r: Recipe, classifier: nn.Module, real: tuple[Tensor, Tensor], seed: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    q.eval()

    def sample(i: int, n: int) -> Tensor:
        return q(torch.randn(n, r.z_dim, generator=gen), manifold=i)

    rep = sample_manifold_class_report(sample, classifier, r.num_biases, 100, real_images=real[0], real_labels=real[1])
    q.train()
    return rep.summary()


def run_cell(name: str, r: Recipe, seed: int, out: Path, eval_every: int, done: set[tuple[str, int, int]]) -> None:
    if (name, seed, r.steps) in done:
        return
    torch.manual_seed(seed)
    data = load_digits(r.data)
    xt, yt = load_mnist(None, "test")
    real = (to_model_range(xt).reshape(-1, 1, 28, 28), yt)
    classifier = load_mnist_classifier()
    q, critic, head, opt_g, opt_d = build(r)
    ema = AveragedModel(q, multi_avg_fn=get_ema_multi_avg_fn(r.ema), use_buffers=True) if r.ema > 0 else None
    ckpt = out / "ckpt" / f"{name}__{seed}.pt"
    start, elapsed = 0, 0.0
    if ckpt.exists():
        st = torch.load(ckpt, weights_only=False)
        for m, k in ((q, "q"), (critic, "critic"), (head, "head"), (opt_g, "opt_g"), (opt_d, "opt_d")):
            m.load_state_dict(st[k])
        if ema is not None:
            ema.load_state_dict(st["ema"])
        torch.set_rng_state(st["rng"])
        start, elapsed = st["step"], st["elapsed"]
    t0 = time.perf_counter() - elapsed
    for step in range(start + 1, r.steps + 1):
        losses = train_step(r, q, critic, head, opt_g, opt_d, data)
        if ema is not None:
            ema.update_parameters(q)
        if step % eval_every == 0 or step == r.steps:
            t_eval = time.perf_counter()
            train_s = t_eval - t0
            row = {"cell": name, "seed": seed, "step": step, "train_s": round(train_s, 1),
                   "final": step == r.steps, "recipe": asdict(r), **losses,
                   **evaluate(q if ema is None else ema.module, r, classifier, real, seed=1000 + step)}
            with open(out / "results.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{name} seed {seed} step {step}: NMI {row['nmi']:.3f} distinct {row['distinct_majorities']} "
                  f"confident {row['confident']:.2f} min share {row['min_class_share']:.3f} "
                  f"diversity {row.get('diversity', float('nan')):.2f} ({train_s:.0f} s)", flush=True)
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"q": q.state_dict(), "critic": critic.state_dict(), "head": head.state_dict(),
                        "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "rng": torch.get_rng_state(),
                        "step": step, "elapsed": train_s, **({"ema": ema.state_dict()} if ema else {})}, tmp)
            os.replace(tmp, ckpt)
            t0 += time.perf_counter() - t_eval  # evaluation time is not training time


def load_results(out: Path) -> list[dict[str, Any]]:
    path = out / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


METRICS = ("nmi", "distinct_majorities", "confident", "min_class_share", "diversity")


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "—"
    m = sum(values) / len(values)
    if len(values) < 2:
        return f"{m:.3f}"
    sd = (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{m:.3f} ± {sd:.3f}"


def plot_curves(rows: list[dict[str, Any]], path: Path, metric: str = "nmi") -> Path:
    """``metric`` against training steps, one polyline per cell (mean over seeds), as a PNG."""
    series: dict[str, list[tuple[float, float]]] = {}
    for cell in sorted({r["cell"] for r in rows}):
        by_step: dict[int, list[float]] = {}
        for r in rows:
            if r["cell"] == cell:
                by_step.setdefault(r["step"], []).append(r[metric])
        series[cell] = [(st, sum(v) / len(v)) for st, v in sorted(by_step.items())]
    return save_line_plot(series, path, "steps", f"{metric}, mean over seeds")


#: The step at which every cell is compared besides its last (the shortest cell's length).
COMMON_STEP = 1600


def at_step(rows: list[dict[str, Any]], cell: str, step: int) -> list[float]:
    """NMI of ``cell`` at ``step``, one value per seed that has a finished run reaching it."""
    finished = {r["seed"] for r in rows if r["cell"] == cell and r["final"]}
    return [float(r["nmi"]) for r in rows if r["cell"] == cell and r["step"] == step and r["seed"] in finished]


def write_report(out: Path) -> Path:
    """``out/ABLATION.md`` (final-step table, per-seed table) and ``out/nmi_curves.png`` from
    ``out/results.jsonl``."""
    rows = load_results(out)
    if not rows:
        raise SystemExit(f"error: no results in {out / 'results.jsonl'}; run the study first")
    last: dict[tuple[str, int], dict[str, Any]] = {}  # a cell-seed continued to more steps: its last final
    for r in rows:
        if r["final"] and r["step"] >= last.get((r["cell"], r["seed"]), {"step": -1})["step"]:
            last[(r["cell"], r["seed"])] = r
    finals: dict[str, list[dict[str, Any]]] = {}
    for (cell, _), r in sorted(last.items()):
        finals.setdefault(cell, []).append(r)
    at = COMMON_STEP
    lines = ["# Manifold separation: recipe ablation (Q-WGAN, MNIST, CPU)", "",
             "Made by `python benchmarks/separation_ablation.py --report` from `results.jsonl` (written by "
             "`python benchmarks/separation_ablation.py --cells ...`). Each cell: one recipe, trained for its "
             "steps at batch 32; report on 100 samples per manifold with the bundled MNIST classifier. "
             "Values: mean ± sd over seeds at the cell's last step; `nmi@" + str(at) + "`: NMI at step "
             f"{at}, the budget every cell reached (cells differ in length). `train_s`: training seconds "
             "(1 thread, shared machine: compare within one page only).", "",
             "| cell | recipe (changes from the paper's) | steps | seeds | " + " | ".join(METRICS)
             + f" | nmi@{at} | train_s |",
             "|---|---|---|---|" + "---|" * len(METRICS) + "---|---|"]
    for cell in sorted(finals, key=lambda c: -sum(r["nmi"] for r in finals[c]) / len(finals[c])):
        rs = finals[cell]
        recipe = {k: v for k, v in rs[0]["recipe"].items() if asdict(PAPER).get(k) != v and k != "steps"}
        lines.append(f"| {cell} | {', '.join(f'{k}={v}' for k, v in recipe.items()) or '—'} | {rs[0]['step']} | "
                     f"{len(rs)} | " + " | ".join(_mean_sd([float(r[m]) for r in rs]) for m in METRICS)
                     + f" | {_mean_sd(at_step(rows, cell, at))} | {_mean_sd([r['train_s'] for r in rs])} |")
    curves = plot_curves(rows, out / "nmi_curves.png")
    lines += ["", f"![NMI against training steps]({curves.name})", "",
              "Every evaluation (cell, seed, step: NMI / distinct / confident):", ""]
    for cell in sorted({r["cell"] for r in rows}):
        for seed in sorted({r["seed"] for r in rows if r["cell"] == cell}):
            pts = [r for r in rows if r["cell"] == cell and r["seed"] == seed]
            unfinished = "" if any(r["final"] for r in pts) else " (stopped before its last step; not in the table)"
            lines.append(f"- {cell}, seed {seed}{unfinished}: " + "; ".join(
                f"{r['step']}: {r['nmi']:.2f}/{r['distinct_majorities']}/{r['confident']:.2f}" for r in pts))
    path = out / "ABLATION.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", nargs="+", default=["main"], help=f"cell names or groups {sorted(GROUPS)}")
    p.add_argument("--seeds", type=int, default=2, help="seeds per cell (default: 2)")
    p.add_argument("--first-seed", type=int, default=0, help="seeds run are first-seed .. first-seed + seeds - 1")
    p.add_argument("--steps", type=int, default=None, help="override every cell's steps")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/separation"))
    p.add_argument("--report", action="store_true", help="write ABLATION.md from results.jsonl and exit")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report:
        print(f"wrote {write_report(args.out)}")
        return
    names = [c for name in args.cells for c in GROUPS.get(name, [name])]
    unknown = [n for n in names if n not in CELLS]
    if unknown:
        p.error(f"unknown cells {unknown}; choose from {sorted(CELLS)} or groups {sorted(GROUPS)}")
    done = {(r["cell"], r["seed"], r["step"]) for r in load_results(args.out) if r["final"]}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for name in names:
            r = CELLS[name] if args.steps is None else replace(CELLS[name], steps=args.steps)
            run_cell(name, r, seed, args.out, args.eval_every, done)


if __name__ == "__main__":
    main()
