#!/usr/bin/env python
"""Sweep the launch configurations of ``kernels.matmul.linear_step`` (the decoding steps' matrix
products) at the model's projection shapes, to choose ``_step_config``'s rule from measurements.

For every shape of ``bench_kernels.LINEAR_SHAPES`` (or those named with ``--only``) and every
candidate configuration (BLOCK_M x BLOCK_N x BLOCK_K x stages x warps x splits of K, where
``--split auto`` is ``_step_config``'s rule for that tile; rows past M masked):

1. checks the product against F.linear in fp32 on the same bf16 inputs (relative max error
   within bf16 rounding), and that each row's bits at M = 1 and M = 8 equal the same rows among
   64 (batch invariance of that configuration on this GPU); records whether its bits equal those
   of today's configuration (two configurations with equal bits could be chosen by M);
2. times it at M = 1 and M = 64 inside one CUDA graph that cycles through enough copies of the
   weight that it comes from memory, not L2 (``bench_kernels.time_decode``), beside cuBLAS
   (F.linear) and the configuration ``_step_config`` chooses today, measured the same way;
3. prints, per shape and M, the fastest configuration, its share of the weight-read bound (bytes
   of W over the copy bandwidth measured in this run), and its time over cuBLAS's.

Usage (a CUDA GPU)::

    python scripts/tune_step_gemm.py [--only in_proj out_proj ...] [--block-m 16,64] [--block-n 16,32,64]
        [--block-k 128,256] [--stages 3,4,6] [--warps 4] [--split 1,auto] [--json PATH]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kernels as bk  # noqa: E402
from bench_common import format_table, peaks, run_info, write_json  # noqa: E402

SMEM_LIMIT = 227 * 1024  # bytes of shared memory one program may use on an H100 / H200
ROWS = (1, 64)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def candidates(args, n: int, k: int) -> list[dict]:
    import mamba_eval.kernels.matmul as mm

    out = []
    for bm, bn, bkk, stages, warps, split in itertools.product(args.block_m, args.block_n, args.block_k, args.stages,
                                                               args.warps, args.split):
        bkk = min(bkk, max(16, 1 << (max(k, 1) - 1).bit_length()))  # no wider than the next power of two >= K
        smem = stages * (bm + bn) * bkk * 2
        split = mm._step_splits(n, k, bn, bkk) if split == "auto" else int(split)
        cfg = dict(block_m=bm, block_n=bn, block_k=bkk, group_m=64, num_warps=warps, num_stages=stages,
                   mask_m=True, split_k=split)
        if smem <= SMEM_LIMIT and cfg not in out:
            out.append(cfg)
    return out


def label(cfg: dict) -> str:
    return (f"{cfg['block_m']}x{cfg['block_n']}x{cfg['block_k']} w{cfg['num_warps']} s{cfg['num_stages']}"
            f" split {cfg['split_k']}")


def _run(cfg, x, w):
    import mamba_eval.kernels.matmul as mm

    return mm._linear(x, w, None, lambda *a, **k: cfg, "linear_step")


def check(cfg, x, w, today_y) -> tuple[float, bool, bool]:
    """(relative max error against fp32 F.linear, whether rows at M = 1 and 8 equal those among
    64, whether the 64 rows equal today's configuration's bits)."""
    full = _run(cfg, x, w)
    expected = torch.nn.functional.linear(x.float(), w.float())
    err = bk.rel_max_error(full, expected)
    invariant = torch.equal(_run(cfg, x[:1], w), full[:1]) and torch.equal(_run(cfg, x[3:11], w), full[3:11])
    return err, invariant, torch.equal(full, today_y)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", help="shapes whose label contains one of these")
    ap.add_argument("--block-m", type=_ints, default=[16, 64])
    ap.add_argument("--block-n", type=_ints, default=[16, 32, 64])
    ap.add_argument("--block-k", type=_ints, default=[128, 256])
    ap.add_argument("--stages", type=_ints, default=[3, 4, 6])
    ap.add_argument("--warps", type=_ints, default=[4])
    ap.add_argument("--split", type=lambda t: t.split(","), default=["1", "auto"],
                    help="splits of K: numbers, or auto (the rule of _step_config)")
    ap.add_argument("--graph-steps", type=int, default=200)
    ap.add_argument("--json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("tune_step_gemm.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import mamba_eval.kernels.matmul as mm

    device = torch.device("cuda")
    bandwidth = peaks().copy_bytes_per_s
    rows, failures = [], 0
    for layer, k, n, row_stride in bk.LINEAR_SHAPES:
        if args.only and not any(s in layer for s in args.only):
            continue
        (x64, w), _ = bk._linear_case(64, k, n, row_stride)(device)
        bound_ms = n * k * 2 / bandwidth * 1e3
        today = mm._step_config(n, k, torch.bfloat16)
        variants = [("cuBLAS", None)] + [(label(c) + (" (today)" if c == today else ""), c)
                                         for c in candidates(args, n, k)]
        if today not in [c for _, c in variants]:
            variants.append((label(today) + " (today)", today))
        today_y = _run(today, x64, w)
        for name, cfg in variants:
            err, invariant, same = (0.0, True, False) if cfg is None else check(cfg, x64, w, today_y)
            ok = err <= bk.TOLERANCE and (cfg is None or invariant)
            failures += not ok
            fn = bk._torch_linear if cfg is None else (lambda x, weight, c=cfg: _run(c, x, weight))
            for m in ROWS:
                (x, wm), _ = bk._linear_case(m, k, n, row_stride)(device)
                case = bk.Case("matmul", "linear_step", layer, None, state_arg=1, in_place=False)
                ms = bk.time_decode(case, fn, (x, wm), {}, args.graph_steps)
                rows.append({"shape": layer, "K": k, "N": n, "M": m, "config": name, "cfg": cfg, "ms": ms,
                             "bound_ms": bound_ms, "share": bound_ms / ms, "rel_err": err,
                             "invariant": invariant, "same_bits_as_today": same, "ok": ok})
            print(f"{layer}: {name} done", file=sys.stderr, flush=True)

    table = []
    for layer in dict.fromkeys(r["shape"] for r in rows):
        for m in ROWS:
            mine = [r for r in rows if r["shape"] == layer and r["M"] == m]
            cublas = next(r for r in mine if r["cfg"] is None)
            today = next(r for r in mine if r["config"].endswith("(today)"))
            best = min((r for r in mine if r["cfg"] is not None and r["ok"]), key=lambda r: r["ms"], default=None)
            if best is None:
                continue
            table.append([layer, m, f"{cublas['ms'] * 1e3:.1f}", f"{today['ms'] * 1e3:.1f}", best["config"],
                          f"{best['ms'] * 1e3:.1f}", f"{best['share']:.0%}", f"{best['ms'] / cublas['ms']:.2f}"])
    print(format_table(["shape", "M", "cuBLAS us", "today us", "fastest config", "us", "of bound", "/ cuBLAS"],
                       table))
    print(f"bound: bytes of W / copy bandwidth measured in this run ({bandwidth / 1e12:.2f} TB/s); "
          f"{failures} configuration(s) failed the check (not ranked)")
    for bm in args.block_m:
        mine = {(r["shape"], r["config"]): r["same_bits_as_today"] for r in rows if r["cfg"] and r["cfg"]["block_m"] == bm}
        print(f"BLOCK_M {bm}: the bits of today's configuration in {sum(mine.values())} of {len(mine)} "
              "(shape, configuration) pairs")
    if args.json:
        write_json(args.json, {**run_info(), "rows": rows})
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
