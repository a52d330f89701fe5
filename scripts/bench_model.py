"""Model forward throughput with all-position logits, the setup of the anchors table.

For each published shape (random-init weights, bf16, GPU): check the Triton backend against the
reference backend on the same weights, then time ``backbone_forward`` + LM head over all
positions (logits in bf16, as mamba_ssm's ``MambaLMHeadModel`` returns them) at the anchors'
batch shapes, and report tokens/s beside mamba_ssm's figure and the share of the matmul roofline
(2 FLOP per parameter per token; the scans' FLOPs are small next to the projections').

Also reports cold start: the time to the first forward in a process whose Triton cache is
empty (compilation), then again with the cache filled.

    python scripts/bench_model.py --json bench_model.json [--shapes mamba-130m,mamba2-130m]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from mamba_eval.models.releases import release_config

# Published shapes (mamba_eval.models.releases).
SHAPES = ("mamba-130m", "mamba-2.8b", "mamba2-130m", "mamba2-2.7b")
BATCHES = [(64, 128), (256, 128), (16, 2048), (1, 16384)]
# mamba_ssm on the same GPU kind, tokens/s (reference/anchors.md).
ANCHOR = {
    "mamba-130m": [409e3, 623e3, 865e3, 750e3],
    "mamba-2.8b": [53.5e3, 54.1e3, 68.4e3, 66.1e3],
    "mamba2-130m": [260e3, 850e3, 763e3, 471e3],
    "mamba2-2.7b": [72.2e3, 69.0e3, 79.4e3, 80.5e3],
}
MATMUL_PEAK = 805e12  # bf16 matmul, measured on the same GPU kind (anchors.md)


def n_matmul_params(model) -> int:
    """Parameters that take part in a matmul per token (all but the embedding lookup, norms and SSM vectors)."""
    total = 0
    for name, p in model.named_parameters():
        if p.ndim == 2 and "embedding" not in name and "A_log" not in name:
            total += p.numel()
    return total + model.lm_head.weight.numel()  # tied head: the embedding is used as a matmul here


@torch.inference_mode()
def logits_forward(model, ids):
    hidden, _ = model.backbone_forward(ids)
    return torch.nn.functional.linear(hidden, model.lm_head.weight)


def time_forward(model, batch: int, length: int, reps: int = 5) -> float:
    ids = torch.randint(0, 50277, (batch, length), device="cuda")
    logits_forward(model, ids)  # compile / warm up
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        logits_forward(model, ids)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


@torch.inference_mode()
def check(tri, ref) -> float:
    ids = torch.randint(0, 50277, (2, 300), device="cuda")
    a, _ = tri(ids)
    b, _ = ref(ids)
    return float((a - b).abs().max() / b.abs().max())


def cold_start(shape: str) -> dict:
    """Time to the first forward in fresh processes: empty Triton cache, then the filled one."""
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TRITON_CACHE_DIR": cache}
        for label in ("cold", "warm"):
            t0 = time.perf_counter()
            res = subprocess.run(
                [sys.executable, __file__, "--first-forward", shape], env=env,
                capture_output=True, text=True,
            )
            if res.returncode != 0:
                raise RuntimeError(res.stderr[-2000:])
            out[label + "_process_s"] = time.perf_counter() - t0
            out[label + "_first_forward_s"] = json.loads(res.stdout.strip().splitlines()[-1])["first_forward_s"]
    return out


def first_forward(shape: str) -> None:
    from mamba_eval.models.model import LanguageModel

    model = LanguageModel(release_config(shape), backend="triton", device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for batch, length in ((4, 128), (1, 2048)):  # two shapes: what a first lm-eval batch compiles
        logits_forward(model, torch.randint(0, 50277, (batch, length), device="cuda"))
    torch.cuda.synchronize()
    print(json.dumps({"first_forward_s": time.perf_counter() - t0}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--no-cold-start", action="store_true")
    ap.add_argument("--first-forward", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_model.py needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.first_forward:
        first_forward(args.first_forward)
        return 0
    from mamba_eval.models.model import LanguageModel

    rows, results = [], {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": {}}
    for shape in args.shapes.split(","):
        cfg = release_config(shape)
        torch.manual_seed(0)
        tri = LanguageModel(cfg, backend="triton", device="cuda", dtype=torch.bfloat16)
        ref = LanguageModel(cfg, backend="ref", device="cuda", dtype=torch.bfloat16)
        ref.load_state_dict(tri.state_dict())
        err = check(tri, ref)
        del ref
        torch.cuda.empty_cache()
        flop_per_token = 2 * n_matmul_params(tri)
        entry = {"rel_err_vs_ref": err, "flop_per_token": flop_per_token, "runs": []}
        for (batch, length), anchor in zip(BATCHES, ANCHOR[shape]):
            sec = time_forward(tri, batch, length)
            tps = batch * length / sec
            share = tps * flop_per_token / MATMUL_PEAK
            entry["runs"].append(dict(batch=batch, length=length, seconds=sec, tokens_per_s=tps,
                                      anchor_tokens_per_s=anchor, roofline_share=share))
            rows.append((shape, f"B={batch},L={length}", tps, anchor, share, err))
        if not args.no_cold_start:
            entry["cold_start"] = cold_start(shape)
        results["shapes"][shape] = entry
        del tri
        torch.cuda.empty_cache()

    print(f"\n{'shape':<12} {'batch':<13} {'ours tok/s':>11} {'mamba_ssm':>10} {'ratio':>6} {'matmul roofline':>16} {'err vs ref':>10}")
    for shape, b, tps, anchor, share, err in rows:
        print(f"{shape:<12} {b:<13} {tps:>11.0f} {anchor:>10.0f} {tps / anchor:>6.2f} {share:>15.1%} {err:>10.1e}")
    for shape, entry in results["shapes"].items():
        if "cold_start" in entry:
            cs = entry["cold_start"]
            print(f"cold start {shape}: first forward {cs['cold_first_forward_s']:.1f} s with an empty Triton cache "
                  f"({cs['cold_process_s']:.1f} s process), {cs['warm_first_forward_s']:.1f} s with the cache filled")
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(results, f, indent=2)
        os.replace(args.json + ".tmp", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
