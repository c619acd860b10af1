#!/usr/bin/env python
r"""Time to quality: training seconds on this machine until a model's manifolds separate into digit
classes, NMI(manifold; class) >= ``--threshold`` (default 0.6), or the best NMI it reaches in the
budget, for Q-WGAN (sampled from the moving average of G that the main job reports, and from G
itself), DMWGAN-style and InfoGAN, measured in one run.

The models train one after another, each in its own process (this Python), at batch 32 on the
bundled 10k-digit MNIST subset, with the manifold-class report (bundled MNIST classifier) every
``--sample-every`` steps and no FID:

=========  ===================================================================================
qwgan      ``examples/mnist_qwgan.py``, its default recipe (the main job): one generator with
           ten bias banks, λ·R_BA, hinge loss, Adam β1 0.5, G's learning rate 5 times the
           critic's, the manifold-recovery term; reports sample a moving average of G
qwgan-raw  the same, its reports sampling G itself (``--ema 0``), as the baselines' do
dmwgan     ``benchmarks/table1/train_gan.py --model dmwgan --beta1 0.5``: ten generators with
           widths / 4, Wasserstein loss
infogan    ``benchmarks/table1/train_gan.py --model infogan --beta1 0.5``: categorical(10) and
           two continuous codes, mutual-information loss, Wasserstein loss
=========  ===================================================================================

``--beta1 0.5`` gives the GAN baselines the Adam β1 of the Q-WGAN recipe (``train_gan.py``'s
default is the paper's 0.9). The seconds of a report are ``sec_per_step × step`` as the trainer
logs them: its loop's mean seconds per step so far, the periodic reports and sample grids
included, process start-up and data loading not (each process's wall-clock time is recorded
beside them); the example times a row before that step's own report, the Table 1 trainer after it.
After a ``--resume`` the mean covers the steps since the resume only.

Each model's run folder is ``--runs/<model>/`` (default ``runs/time_to_quality``, not committed:
the trainer's ``metrics.json``, ``checkpoint.pt`` (over 100 MB), sample grids, and ``ttq.json``: the
commands run there, their exit status, wall-clock seconds and load averages). A model whose
``metrics.json`` has its final entry at ``--steps`` is not retrained; one with a checkpoint short of
it continues with ``--resume``. After every model, ``--out`` gets ``results.json`` (every report's
step, seconds, NMI, distinct majority classes and confident share; the first report at the
threshold; the best NMI and when), ``TIME_TO_QUALITY.md``, ``nmi_vs_seconds.png`` and, per model,
the trainer's ``<model>_metrics.json`` and last sample grid ``<model>_samples.png``, all rewritten
from the run folders.

    python benchmarks/time_to_quality.py                          # all four, 2400 steps each (resumable)
    python benchmarks/time_to_quality.py --models qwgan dmwgan    # a subset
    python benchmarks/time_to_quality.py --report                 # the page again, from results.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _timing import machine  # benchmarks/_timing.py (the script's folder is on sys.path)

from qmm_plugin.io import atomic_write_text
from qmm_plugin.paper.training import CHECKPOINT_NAME, read_checkpoint
from qmm_plugin.paper.viz import save_line_plot

REPO = Path(__file__).resolve().parents[1]
TRAIN_GAN = REPO / "benchmarks" / "table1" / "train_gan.py"


@dataclass(frozen=True)
class Model:
    """One contender: its trainer, the flags it gets besides the common ones, and what it is."""

    label: str
    script: Path
    flags: tuple[str, ...]
    what: str
    settings: tuple[str, ...]  # the trainer's arguments (from its checkpoint) shown in the page


MODELS: dict[str, Model] = {
    "qwgan": Model("Q-WGAN", REPO / "examples" / "mnist_qwgan.py", (),
                   "one generator, ten bias banks, λ·R_BA; the example's default recipe",
                   ("preset", "loss", "beta1", "info", "stratified", "lam", "lr", "g_lr_scale", "ema",
                    "batch_size")),
    "qwgan-raw": Model("Q-WGAN, G itself", REPO / "examples" / "mnist_qwgan.py", ("--ema", "0"),
                       "the same recipe, reports sampling G itself instead of its moving average",
                       ("preset", "loss", "beta1", "info", "stratified", "lam", "lr", "g_lr_scale", "ema",
                        "batch_size")),
    "dmwgan": Model("DMWGAN-style", TRAIN_GAN, ("--model", "dmwgan", "--beta1", "0.5"),
                    "ten generators with widths / 4, Wasserstein loss",
                    ("model", "beta1", "lr", "n_critic", "batch_size")),
    "infogan": Model("InfoGAN", TRAIN_GAN, ("--model", "infogan", "--beta1", "0.5"),
                     "categorical(10) + 2 continuous codes, mutual-information loss, Wasserstein loss",
                     ("model", "beta1", "lr", "n_critic", "batch_size")),
}
DEFAULT_STEPS, DEFAULT_SAMPLE_EVERY = 2400, 200
SMOKE_STEPS, SMOKE_SAMPLE_EVERY = 4, 2
PAGE, PLOT, RESULTS, RUN_LOG = "TIME_TO_QUALITY.md", "nmi_vs_seconds.png", "results.json", "ttq.json"


# ------------------------------------------------------------------------------------- analysis
def report_points(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The logged rows that carry a manifold-class report, as ``{step, seconds, nmi, distinct,
    confident}`` (``seconds = sec_per_step × step``), in step order."""
    return [{"step": r["step"], "seconds": round(r["sec_per_step"] * r["step"], 2), "nmi": r["report/nmi"],
             "distinct": r["report/distinct_majorities"], "confident": r["report/confident"]}
            for r in sorted(rows, key=lambda r: r["step"]) if "report/nmi" in r]


def first_reaching(points: list[dict[str, Any]], threshold: float) -> dict[str, Any] | None:
    """The first point (lowest step) whose NMI is at least ``threshold``; ``None`` if none is."""
    return next((p for p in sorted(points, key=lambda p: p["step"]) if p["nmi"] >= threshold), None)


def best_point(points: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The point with the highest NMI (the earliest of equals); ``None`` without points."""
    return max(sorted(points, key=lambda p: p["step"]), key=lambda p: p["nmi"], default=None)


def with_threshold(results: dict[str, Any], threshold: float) -> dict[str, Any]:
    """``results`` with every model's ``reached`` (first report at ``threshold``) recomputed."""
    for m in results["models"].values():
        m["reached"] = first_reaching(m["points"], threshold)
    return {**results, "threshold": threshold}


# ------------------------------------------------------------------------------------ training
def command(name: str, run_dir: Path, steps: int, sample_every: int, seed: int, smoke: bool,
            resume: bool) -> list[str]:
    """The trainer's command line for ``name`` into ``run_dir``."""
    m = MODELS[name]
    return [sys.executable, str(m.script), *m.flags, "--steps", str(steps), "--sample-every", str(sample_every),
            "--no-progress", "--fid-samples", "0", "--out", str(run_dir), "--seed", str(seed),
            *(["--smoke"] if smoke else []), *(["--resume"] if resume else [])]


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def run_state(run_dir: Path, steps: int, plan: dict[str, Any]) -> str:
    """``"done"`` (final entry at ``steps``), ``"resume"`` (a checkpoint short of it) or ``"new"``;
    ``SystemExit`` if the folder holds a run with other settings (``plan``) or more steps."""
    log = _read_json(run_dir / RUN_LOG)
    clash = {k: log[k] for k in plan if k in log and log[k] != plan[k]}
    if clash:
        raise SystemExit(f"error: {run_dir} holds a run made with {clash}, not {({k: plan[k] for k in clash})}; "
                         "pass the same settings, or another --runs")
    metrics = _read_json(run_dir / "metrics.json")
    last = max((r["step"] for r in metrics.get("rows", [])), default=0)
    if last > steps:
        raise SystemExit(f"error: {run_dir} already holds {last} steps, more than --steps {steps}; "
                         "pass --steps >= that, or another --runs")
    if metrics.get("final", {}).get("steps") == steps and last == steps:
        return "done"
    return "resume" if (run_dir / CHECKPOINT_NAME).is_file() else "new"


def train(name: str, run_dir: Path, steps: int, sample_every: int, seed: int, smoke: bool) -> None:
    """Bring ``name``'s run in ``run_dir`` to ``steps`` (skip, resume or start), in a subprocess;
    its command, exit status, wall-clock seconds and load averages go to ``run_dir/ttq.json``."""
    plan = {"seed": seed, "sample_every": sample_every, "smoke": smoke}
    state = run_state(run_dir, steps, plan)
    if state == "done":
        print(f"{name}: {steps} steps already in {run_dir}; not retrained", flush=True)
        return
    argv = command(name, run_dir, steps, sample_every, seed, smoke, resume=state == "resume")
    print(f"{name}: {shlex.join(argv)}", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    load_start, t0 = os.getloadavg(), time.perf_counter()
    proc = subprocess.Popen(argv)
    try:
        code = proc.wait()
    except KeyboardInterrupt:  # the trainer got the same Ctrl-C: it writes its checkpoint and exits
        code = proc.wait()
    log = _read_json(run_dir / RUN_LOG) or {**plan, "invocations": []}
    log["invocations"].append({"argv": argv, "exit": code, "wall_s": round(time.perf_counter() - t0, 1),
                               "loadavg_at_start": list(load_start), "loadavg_at_end": list(os.getloadavg()),
                               "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())})
    if (run_dir / CHECKPOINT_NAME).is_file():
        saved = read_checkpoint(run_dir / CHECKPOINT_NAME)["args"]
        log["settings"] = {k: saved.get(k) for k in MODELS[name].settings} | {"data_dir": saved.get("data_dir")}
    atomic_write_text(json.dumps(log, indent=1) + "\n", run_dir / RUN_LOG)
    if code != 0:
        raise SystemExit(f"error: {name} exited with status {code} (its output is above); run the same "
                         f"command again to continue it from {run_dir / CHECKPOINT_NAME}")


def summarize(name: str, run_dir: Path, steps: int, threshold: float) -> dict[str, Any]:
    """``name``'s entry of ``results.json``, from its run folder."""
    metrics, log = _read_json(run_dir / "metrics.json"), _read_json(run_dir / RUN_LOG)
    points = report_points(metrics.get("rows", []))
    invocations = log.get("invocations", [])
    finished = metrics.get("final", {}).get("steps")
    return {"label": MODELS[name].label, "what": MODELS[name].what, "settings": log.get("settings", {}),
            "steps": finished or steps, "finished": finished is not None and bool(points)
            and points[-1]["step"] == finished,
            "invocations": invocations, "processes": len(invocations),
            "process_wall_s": round(sum(i["wall_s"] for i in invocations), 1),
            "points": points, "reached": first_reaching(points, threshold), "best": best_point(points),
            "end": points[-1] if points else None}


def collect(runs: Path, out: Path, steps: int, threshold: float, run_command: str | None,
            host: dict[str, Any]) -> dict[str, Any]:
    """``results.json``'s content from every model's run folder in ``runs`` (models without one are
    left out; their trainer's ``metrics.json`` and last sample grid are copied into ``out``);
    ``run_command`` joins the commands of earlier runs into ``out``."""
    old = _read_json(out / RESULTS)
    commands = list(old.get("commands", []))
    if run_command is not None and run_command not in commands:
        commands.append(run_command)
    models = {n: summarize(n, runs / n, steps, threshold) for n in MODELS if (runs / n / "metrics.json").is_file()}
    for name, m in models.items():
        shutil.copyfile(runs / name / "metrics.json", out / f"{name}_metrics.json")
        grid = runs / name / f"samples_step{m['end']['step']}.png" if m["end"] else None
        if grid is not None and grid.is_file():
            shutil.copyfile(grid, out / f"{name}_samples.png")
    return {"threshold": threshold, "commands": commands, "machine": host,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "models": models}


# --------------------------------------------------------------------------------------- page
def _settings_text(m: dict[str, Any]) -> str:
    s = dict(m["settings"])
    data = s.pop("data_dir", None)
    flags = ", ".join(f"{k} {v}" for k, v in s.items())
    return f"{m['what']}; {flags}" + ("" if data is None else f"; data {data}")


def _shown(argv: list[str]) -> str:
    """A trainer's command line as run from the repository root (``python``, relative paths)."""
    return shlex.join(["python", *(a.removeprefix(f"{REPO}{os.sep}") for a in argv[1:])])


def _reached_text(m: dict[str, Any]) -> str:
    if m["reached"] is not None:
        return f"{m['reached']['seconds']:.0f} s (step {m['reached']['step']})"
    if m["best"] is None:
        return "no report yet"
    b = m["best"]
    return f"not reached (best {b['nmi']:.3f} at {b['seconds']:.0f} s, step {b['step']})"


def write_page(results: dict[str, Any], out: Path) -> Path:
    """``out/TIME_TO_QUALITY.md`` and ``out/nmi_vs_seconds.png`` from ``results`` alone."""
    t, host, models = results["threshold"], results["machine"], results["models"]
    series = {m["label"]: [(p["seconds"], p["nmi"]) for p in m["points"]] for m in models.values() if m["points"]}
    lines = [f"# Time to quality: NMI(manifold; class) ≥ {t} (MNIST, CPU)", "",
             "Made by " + ", then ".join(f"`{c}`" for c in results["commands"]) + " (the page again: "
             "`python benchmarks/time_to_quality.py --report`). Each model trained in its own process, one "
             "after another, at batch 32 on the bundled 10k-digit MNIST subset unless its settings say "
             "otherwise; the manifold-class report (bundled MNIST classifier) every `--sample-every` steps. "
             "The GAN baselines run with `--beta1 0.5`, the Adam β1 of the Q-WGAN recipe "
             "(`train_gan.py`'s default is the paper's 0.9).", "",
             f"Times are on a {host.get('logical_cpus')}-core CPU shared with other jobs ({host.get('cpu')}; "
             f"OMP_NUM_THREADS={results.get('omp_num_threads')}; each trainer process's load averages are "
             "listed below): comparable within this page only. Seconds are "
             "`sec_per_step × step` as each trainer logs it (its loop's mean, the periodic reports and grids "
             "included; the example times a row before that step's own report, the Table 1 trainer after "
             "it); *process s* is the wall-clock time of the trainer's processes (start-up and data loading "
             "included). A model trained in more than one process was resumed: its seconds after the resume "
             "are the resumed process's mean × step.", "",
             f"| model | settings | steps | seconds to NMI ≥ {t} | at the end: NMI / distinct majorities / "
             "confident | training s at the end | process s |", "|---|---|---|---|---|---|---|"]
    for name, m in models.items():
        end = m["end"]
        at_end = "—" if end is None else f"{end['nmi']:.3f} / {end['distinct']} / {end['confident']:.2f}"
        steps = str(m["steps"]) if m["finished"] else f"{end['step'] if end else 0} of {m['steps']} (unfinished)"
        resumed = f" in {m['processes']} processes" if m["processes"] > 1 else ""
        lines.append(f"| {m['label']} (`{name}`) | {_settings_text(m)} | {steps} | {_reached_text(m)} | "
                     f"{at_end} | {'—' if end is None else format(end['seconds'], '.0f')} | "
                     f"{m['process_wall_s']:.0f}{resumed} |")
    if series:
        save_line_plot(series, out / PLOT, "training seconds", "NMI(manifold; class)", hlines=[t])
        lines += ["", f"![NMI against training seconds]({PLOT})"]
    grids = [(m["label"], f"{name}_samples.png") for name, m in models.items()
             if (out / f"{name}_samples.png").is_file()]
    if grids:
        lines += ["", "Last sample grids (one row per manifold, labelled with its majority class; the trainers' "
                  "`metrics.json` are beside them as `<model>_metrics.json`):", ""]
        lines += [f"![{label}]({file})" for label, file in grids]
    lines += ["", "Every report (step: seconds, NMI / distinct / confident):", ""]
    for name, m in models.items():
        lines.append(f"- {m['label']}: " + "; ".join(
            f"{p['step']}: {p['seconds']:.0f} s, {p['nmi']:.3f} / {p['distinct']} / {p['confident']:.2f}"
            for p in m["points"]))
    lines += ["", "Trainer processes (exit status, wall-clock seconds, 1-minute load average at start → end):", ""]
    lines += [f"- {m['label']}: `{_shown(i['argv'])}` (exit {i['exit']}, {i['wall_s']:.0f} s, load "
              f"{i['loadavg_at_start'][0]:.2f} → {i['loadavg_at_end'][0]:.2f})"
              for m in models.values() for i in m["invocations"]]
    path = out / PAGE
    atomic_write_text("\n".join(lines) + "\n", path)
    return path


def write_results(results: dict[str, Any], out: Path) -> None:
    atomic_write_text(json.dumps(results, indent=1) + "\n", out / RESULTS)
    print(f"wrote {out / RESULTS} and {write_page(results, out)}", flush=True)


# ---------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS),
                   help="which models, in this order (default: all)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps per model (default: {DEFAULT_STEPS}; --smoke: {SMOKE_STEPS})")
    p.add_argument("--sample-every", type=int, default=None,
                   help=f"a report every N steps (default: {DEFAULT_SAMPLE_EVERY}; --smoke: {SMOKE_SAMPLE_EVERY})")
    p.add_argument("--seed", type=int, default=0, help="the trainers' --seed (default: 0)")
    p.add_argument("--threshold", type=float, default=0.6, help="the NMI to reach (default: 0.6)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "time_to_quality",
                   help="results.json, the page, the plot (default: benchmarks/results/time_to_quality)")
    p.add_argument("--runs", type=Path, default=REPO / "runs" / "time_to_quality",
                   help="the trainers' run folders, with their checkpoints (default: runs/time_to_quality)")
    p.add_argument("--report", action="store_true", help="rewrite the page from OUT/results.json only")
    p.add_argument("--smoke", action="store_true", help="the trainers' --smoke: a few steps, tiny batches (tests)")
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = SMOKE_STEPS if args.smoke else DEFAULT_STEPS
    if args.sample_every is None:
        args.sample_every = SMOKE_SAMPLE_EVERY if args.smoke else DEFAULT_SAMPLE_EVERY
    for flag in ("steps", "sample_every"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not 0.0 < args.threshold <= 1.0:
        p.error(f"--threshold is an NMI in (0, 1], got {args.threshold}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    if args.report:
        if not (out / RESULTS).is_file():
            raise SystemExit(f"error: no {out / RESULTS}; run the benchmark first (without --report)")
        write_results(with_threshold(_read_json(out / RESULTS), args.threshold), out)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    runs = args.runs.resolve()
    run_command = shlex.join(["python", "benchmarks/time_to_quality.py", *(sys.argv[1:] if argv is None else argv)])
    if os.environ.get("OMP_NUM_THREADS"):
        run_command = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} {run_command}"
    host = machine()
    for name in args.models:
        try:
            train(name, runs / name, args.steps, args.sample_every, args.seed, args.smoke)
        finally:  # also after a failed or stopped model: the page shows what there is
            write_results(collect(runs, out, args.steps, args.threshold, run_command, host), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
