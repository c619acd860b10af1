"""What raising glibc's malloc thresholds (``qmm_plugin/paper/training.py: tune_cpu_allocator``) saves.

The setting is per process and cannot be undone cleanly inside one, so each measurement is a
fresh child process: ``--pairs`` pairs of children, one with glibc's defaults and one tuned, their
order alternating from pair to pair so slow drift of a shared machine hits both alike. Each child
times the training steps of ``benchmarks/run.py`` (interleaved, after warm-up): the WGAN and
Q-WGAN steps (critic + generator, B=64, A=10), and the β-VAE step, the Q-β-VAE EM step of
``examples/mnist_qbvae.py`` and the same EM with the decoder run A times. The ratio of a pair is
tuned / default step time; the table gives the median over pairs and their range.

Usage::

    python benchmarks/bench_allocator.py                 # 4 pairs, about 6 minutes
    python benchmarks/bench_allocator.py --pairs 2 --rounds 3 --out /tmp/alloc   # quick look

Writes ``allocator.md`` and ``allocator.json`` under ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def child(section: str, tuned: bool, rounds: int, threads: int) -> dict[str, float]:
    """Median step time in ms per variant, in this (fresh) process."""
    import torch

    from qmm_plugin.paper.training import tune_cpu_allocator

    allocator = tune_cpu_allocator() if tuned else "glibc defaults"
    import run  # benchmarks/run.py (the child runs this file as a script: its folder is on sys.path)
    from _timing import interleaved

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    if section == "gan":
        steps, _ = run.gan_variants(64, 10, 1.0, gen, tiny=False)
        variants = {k: steps[k] for k in ("WGAN", "Q-WGAN")}
    else:
        variants = run.vae_variants(64, 10, gen)
    t = interleaved(variants, rounds=rounds, warmup=2)
    return {"allocator": allocator, **{k: t.summary(k)["median"] for k in variants}}  # type: ignore[dict-item]


def run_child(section: str, tuned: bool, rounds: int, threads: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", section, "--rounds", str(rounds), "--threads", str(threads)]
    if tuned:
        cmd.append("--tuned")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = ["# glibc malloc thresholds: training steps, default vs tuned", "",
             f"Produced by `{res['command']}` on {m['date_utc']} UTC (git {m['git_commit']}).", "",
             f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']} with "
             f"{res['threads']} threads. Tuned: {res['tuned_allocator']}. {res['pairs']} pairs of fresh "
             f"processes (default, tuned; order alternating), {res['rounds']} interleaved rounds each "
             "after 2 warm-up rounds; a process's time is its median step.", "",
             "| step | default ms (median over pairs) | tuned ms | tuned / default: median [min–max] over pairs |",
             "|---|---|---|---|"]
    for name, r in res["steps"].items():
        lines.append(f"| {name} | {r['default_ms']:.1f} | {r['tuned_ms']:.1f} | "
                     f"{r['ratio']['median']:.3f} [{r['ratio']['min']:.3f}–{r['ratio']['max']:.3f}] |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=4, help="pairs of child processes (default 4)")
    p.add_argument("--rounds", type=int, default=10, help="timed rounds per child (default 10)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--child", choices=("gan", "vae"), help=argparse.SUPPRESS)
    p.add_argument("--tuned", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.tuned, args.rounds, args.threads)))
        return None
    if args.pairs < 1 or args.rounds < 1:
        p.error(f"--pairs and --rounds must be >= 1, got {args.pairs} and {args.rounds}")
    from _timing import machine
    from tqdm.auto import tqdm

    per: dict[str, dict[str, list[float]]] = {}
    tuned_line = ""
    with tqdm(total=2 * 2 * args.pairs, desc="processes", unit="proc") as bar:
        for k in range(args.pairs):
            for section in ("gan", "vae"):
                order = (False, True) if k % 2 == 0 else (True, False)
                got = {}
                for tuned in order:
                    got[tuned] = run_child(section, tuned, args.rounds, args.threads)
                    bar.update(1)
                tuned_line = got[True].pop("allocator")
                got[False].pop("allocator")
                for name in got[False]:
                    d = per.setdefault(name, {"default": [], "tuned": []})
                    d["default"].append(got[False][name])
                    d["tuned"].append(got[True][name])
    steps = {}
    for name, d in per.items():
        ratios = [t / f for t, f in zip(d["tuned"], d["default"])]
        steps[name] = {"default_ms": statistics.median(d["default"]), "tuned_ms": statistics.median(d["tuned"]),
                       "ratio": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
                       "default_all_ms": d["default"], "tuned_all_ms": d["tuned"]}
    res = {"command": "python benchmarks/bench_allocator.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": machine(), "threads": args.threads, "pairs": args.pairs, "rounds": args.rounds,
           "tuned_allocator": tuned_line, "steps": steps}
    res["command"] = res["command"].strip()
    from qmm_plugin.io import atomic_write_text

    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(res, indent=1), args.out / "allocator.json")
    atomic_write_text(markdown(res), args.out / "allocator.md")
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
