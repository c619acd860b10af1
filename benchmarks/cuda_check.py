"""Prepared GPU check for the Triton kernels (run by a session that has a CUDA device).

1. Correctness: the registered CUDA kernels of ``qmm::multi_bias_linear`` / ``sample_bias_linear``
   / ``segment_sum`` against the CPU reference (float64 on CPU vs float32 with IEEE matmuls on
   GPU), forward and backward, 2-D and ``(B, ..., in)`` inputs; ``multi_bias_linear_spread``
   (output, spread and their gradients) on CUDA against the same reference.
2. ``torch.compile(fullgraph=True)`` of a converted MNIST generator on CUDA (inductor).
3. Timing at the paper's shapes, forward and forward+backward, interleaved with medians/IQR:
   the Triton op vs the reference path on the GPU (cuBLAS ``addmm`` with a gathered bias) vs
   plain ``F.linear`` (the floor; target: op <= 1.05x F.linear).

Writes ``benchmarks/results/cuda.json`` and ``cuda.md``. Usage (about 2-4 minutes)::

    python benchmarks/cuda_check.py [--out benchmarks/results] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from _timing import machine  # benchmarks/_timing.py (the script's folder is on sys.path)

import qmm_plugin
from qmm_plugin.io import atomic_write_text
from qmm_plugin.ops import multi_bias_linear, multi_bias_linear_spread, sample_bias_linear


def _quart(v: list[float]) -> dict[str, float]:
    t = torch.tensor(v)
    return {"median": float(t.median()), "q1": float(t.quantile(0.25)), "q3": float(t.quantile(0.75)), "n": len(v)}


def correctness() -> dict[str, float]:
    from qmm_plugin import _triton

    _triton.register()
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator().manual_seed(0)
    errs: dict[str, float] = {}
    for shape_x in [(64, 8), (37, 1024), (6, 5, 19)]:
        fan_in, fan_out, num = shape_x[-1], 257, 7
        x = torch.randn(*shape_x, generator=g, dtype=torch.float64)
        w = torch.randn(fan_out, fan_in, generator=g, dtype=torch.float64) / fan_in ** 0.5
        bank = torch.randn(num, fan_out, generator=g, dtype=torch.float64)
        idx = torch.randint(0, num, (shape_x[0],), generator=g)
        gy = torch.randn(*shape_x[:-1], fan_out, generator=g, dtype=torch.float64)
        outs = {}
        for dev, dt in (("cpu", torch.float64), ("cuda", torch.float32)):
            leaves = [t.detach().to(dev, dt).requires_grad_() for t in (x, w, bank)]
            y = multi_bias_linear(*leaves, idx.to(dev))
            y.backward(gy.to(dev, dt))
            rows = bank[idx].to(dev, dt)
            ys = sample_bias_linear(leaves[0].detach(), leaves[1].detach(), rows)
            # the op with the layer's R_BA spread (reference implementation on every device)
            sl = [t.detach().to(dev, dt).requires_grad_() for t in (x, w, bank)]
            y2, spread = multi_bias_linear_spread(*sl, idx.to(dev))
            torch.autograd.backward([y2, spread], [gy.to(dev, dt), None])
            outs[dev] = [t.detach().double().cpu() for t in (y, leaves[0].grad, leaves[1].grad, leaves[2].grad, ys,
                                                              y2, spread, sl[1].grad, sl[2].grad)]
        names = ["y", "grad_x", "grad_w", "grad_bank", "y_sample", "spread_y", "spread", "spread_grad_w",
                 "spread_grad_bank"]
        for name, a, b in zip(names, outs["cpu"], outs["cuda"]):
            err = float((a - b).abs().max() / (a.abs().max() + 1e-12))
            errs[f"{name}{list(shape_x)}"] = err
            if err > 1e-5:
                raise AssertionError(f"CUDA kernel mismatch in {name} for x{list(shape_x)}: rel err {err:.2e}")
    return errs


def compile_check() -> str:
    from qmm_plugin.paper.models import MNISTGenerator

    q = qmm_plugin.convert(MNISTGenerator(8), 10).cuda()
    z, idx = torch.randn(64, 8, device="cuda"), torch.randint(0, 10, (64,), device="cuda")
    torch._dynamo.reset()
    c = torch.compile(q, fullgraph=True)
    y = c(z, manifold=idx)
    y.mean().backward()
    torch.testing.assert_close(y, q(z, manifold=idx), rtol=1e-3, atol=1e-3)
    return "ok (fullgraph=True, inductor, forward+backward)"


def timing(quick: bool) -> list[dict[str, Any]]:
    torch.backends.cuda.matmul.allow_tf32 = False
    shapes = [(8, 1024), (1024, 6272), (10, 256), (256, 8192)]
    rows: list[dict[str, Any]] = []
    for fan_in, fan_out in shapes:
        for batch in ([64, 1024] if quick else [64, 256, 1024]):
            for num in ([10] if quick else [1, 10, 100]):
                x = torch.randn(batch, fan_in, device="cuda", requires_grad=True)
                w = torch.randn(fan_out, fan_in, device="cuda", requires_grad=True)
                b = torch.randn(fan_out, device="cuda", requires_grad=True)
                bank = torch.randn(num, fan_out, device="cuda", requires_grad=True)
                idx = torch.randint(0, num, (batch,), device="cuda")
                gy = torch.randn(batch, fan_out, device="cuda")
                fwd = {
                    "F.linear": lambda: F.linear(x, w, b),
                    "triton op": lambda: multi_bias_linear(x, w, bank, idx),
                    "addmm+gathered bias": lambda: torch.addmm(bank.index_select(0, idx), x, w.t()),
                }
                fb = {
                    "F.linear": lambda: F.linear(x, w, b).backward(gy),
                    "triton op": lambda: multi_bias_linear(x, w, bank, idx).backward(gy),
                    "addmm+gathered bias": lambda: torch.addmm(bank.index_select(0, idx), x, w.t()).backward(gy),
                }
                row: dict[str, Any] = {"in": fan_in, "out": fan_out, "B": batch, "A": num}
                for label, fns in (("fwd", fwd), ("fwd+bwd", fb)):
                    times: dict[str, list[float]] = {k: [] for k in fns}
                    for f in fns.values():
                        for _ in range(5):
                            f()
                    torch.cuda.synchronize()
                    for _ in range(30):
                        for k, f in fns.items():
                            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                            s.record()
                            for _ in range(10):
                                f()
                            e.record()
                            torch.cuda.synchronize()
                            times[k].append(s.elapsed_time(e) / 10)
                    row[label] = {k: _quart(v) for k, v in times.items()}
                    row[label + " ratio op/F.linear"] = _quart(
                        [a / c for a, c in zip(times["triton op"], times["F.linear"])])
                    row[label + " ratio op/addmm+gather"] = _quart(
                        [a / c for a, c in zip(times["triton op"], times["addmm+gathered bias"])])
                rows.append(row)
                print(f"{fan_in}->{fan_out} B={batch} A={num}: fwd op/F.linear "
                      f"{row['fwd ratio op/F.linear']['median']:.3f}, fwd+bwd "
                      f"{row['fwd+bwd ratio op/F.linear']['median']:.3f}", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("cuda_check.py needs a CUDA device (torch.cuda.is_available() is False); "
                         "run it on a GPU machine with `pip install triton`")
    res: dict[str, Any] = {"machine": machine()}
    res["correctness_rel_err"] = correctness()
    print("correctness ok")
    res["compile"] = compile_check()
    print("compile", res["compile"])
    res["timing"] = timing(args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(res, indent=1), args.out / "cuda.json")
    lines = [f"# CUDA check ({res['machine']['cuda_device']}, torch {res['machine']['torch']})", "",
             f"Correctness: max relative error {max(res['correctness_rel_err'].values()):.2e}; compile: "
             f"{res['compile']}.", "", "| in→out | B | A | F.linear fwd+bwd ms | op fwd+bwd ms | op/F.linear fwd | "
             "op/F.linear fwd+bwd | op/addmm+gather fwd+bwd |", "|---|---|---|---|---|---|---|---|"]
    for r in res["timing"]:
        lines.append(f"| {r['in']}→{r['out']} | {r['B']} | {r['A']} | {r['fwd+bwd']['F.linear']['median']:.4f} | "
                     f"{r['fwd+bwd']['triton op']['median']:.4f} | {r['fwd ratio op/F.linear']['median']:.3f} | "
                     f"{r['fwd+bwd ratio op/F.linear']['median']:.3f} | "
                     f"{r['fwd+bwd ratio op/addmm+gather']['median']:.3f} |")
    atomic_write_text("\n".join(lines) + "\n", args.out / "cuda.md")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
