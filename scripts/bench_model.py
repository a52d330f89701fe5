"""Model forward throughput with all-position logits, the setup of the anchors' forward table.

For each published shape (random-init weights, bf16, GPU): check the Triton backend against the
reference backend on the same weights, then time ``backbone_forward`` + LM head over all
positions (logits in bf16, as mamba_ssm's ``MambaLMHeadModel`` returns them) at the anchors'
batch shapes, and report tokens/s with the share of this GPU's bf16 matmul peak, measured in the
run (``bench_common.peaks``; 2 FLOP per matmul weight per token: the scans' FLOPs are small next
to the projections').

When mamba_ssm imports, its ``MambaLMHeadModel`` (random-init, same shape, bf16) is timed the same
way in the same run, and the table shows its tokens/s and our speed over its. Without it, the
figure stored in ``scripts/anchors.py`` is shown in a column of its own, with no ratio.

Also reports cold start: the time to the first forward in a process whose Triton cache is
empty (compilation), then again with the cache filled.

    python scripts/bench_model.py --json bench_model.json [--shapes mamba-130m,mamba2-130m] [--peer off]
    python scripts/bench_model.py --tiny      # toy sizes on the CPU, Triton interpreted: checks the script
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import anchors  # noqa: E402
from bench_common import format_table, import_peer, matmul_share, median_seconds, run_info, write_json  # noqa: E402

from mamba_eval.models.releases import release  # noqa: E402

# Published shapes (mamba_eval.models.releases).
SHAPES = ("mamba-130m", "mamba-2.8b", "mamba2-130m", "mamba2-2.7b")
BATCHES = [(64, 128), (256, 128), (16, 2048), (1, 16384)]
TINY_BATCHES = [(2, 8)]
TINY = {"d_model": 32, "n_layer": 2}
VOCAB = 50277


def shape_config(shape: str, tiny: bool = False) -> dict:
    """The release's config.json fields (toy sizes with ``tiny``)."""
    return release(shape, **(TINY if tiny else {}))


def model_config(raw: dict):
    from mamba_eval.models.formats import config_from_dict

    return config_from_dict(raw, Path("<bench_model>/config.json"))


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


@torch.inference_mode()
def peer_logits_forward(model, ids):
    return model(ids).logits


def time_forward(forward, model, batch: int, length: int, device, reps: int = 5) -> float:
    ids = torch.randint(0, VOCAB, (batch, length), device=device)
    return median_seconds(lambda: forward(model, ids), reps=reps, warmup=1, device=device)


@torch.inference_mode()
def check(tri, ref, device, length: int = 300) -> float:
    ids = torch.randint(0, VOCAB, (2, length), device=device)
    a, _ = tri(ids)
    b, _ = ref(ids)
    return float((a - b).abs().max() / b.abs().max())


def peer_model(mamba_ssm, raw: dict, device):
    """mamba_ssm's MambaLMHeadModel of the same shape (its own random init), bf16."""
    from mamba_ssm.models.config_mamba import MambaConfig

    fields = {f.name for f in dataclasses.fields(MambaConfig)}
    config = MambaConfig(**{k: v for k, v in raw.items() if k in fields})
    return mamba_ssm.MambaLMHeadModel(config, device=device, dtype=torch.bfloat16).eval()


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

    model = LanguageModel(model_config(shape_config(shape)), backend="triton", device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for batch, length in ((4, 128), (1, 2048)):  # two shapes: what a first lm-eval batch compiles
        logits_forward(model, torch.randint(0, VOCAB, (batch, length), device="cuda"))
    torch.cuda.synchronize()
    print(json.dumps({"first_forward_s": time.perf_counter() - t0}))


def bench_shape(shape: str, args, device, dtype, mamba_ssm, gpu) -> dict:
    from mamba_eval.models.model import LanguageModel

    raw = shape_config(shape, args.tiny)
    torch.manual_seed(0)
    tri = LanguageModel(model_config(raw), backend="triton", device=device, dtype=dtype)
    ref = LanguageModel(model_config(raw), backend="ref", device=device, dtype=dtype)
    ref.load_state_dict(tri.state_dict())
    err = check(tri, ref, device, length=12 if args.tiny else 300)
    del ref
    flop_per_token = 2 * n_matmul_params(tri)
    entry = {"rel_err_vs_ref": err, "flop_per_token": flop_per_token, "runs": []}
    for batch, length in args.batches:
        sec = time_forward(logits_forward, tri, batch, length, device, reps=args.reps)
        tps = batch * length / sec
        entry["runs"].append({"batch": batch, "length": length, "seconds": sec, "tokens_per_s": tps,
                              "roofline_share": matmul_share(tps * flop_per_token) if gpu else None})
    del tri
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if mamba_ssm is not None:
        torch.manual_seed(0)
        peer = peer_model(mamba_ssm, raw, device)
        for run in entry["runs"]:
            sec = time_forward(peer_logits_forward, peer, run["batch"], run["length"], device, reps=args.reps)
            run["peer_tokens_per_s"] = run["batch"] * run["length"] / sec
            run["speed_vs_peer"] = run["tokens_per_s"] / run["peer_tokens_per_s"]
        del peer
        torch.cuda.empty_cache()
    elif not args.tiny:  # stored figures are for the published shapes, not the toy ones
        for run in entry["runs"]:
            found = anchors.stored("model", (shape, run["batch"], run["length"]), gpu)
            if found:
                run["stored_peer_tokens_per_s"], source = found
                run["stored_source"] = source.label
    if device.type == "cuda" and not args.no_cold_start:
        entry["cold_start"] = cold_start(shape)
    return entry


def print_table(results: dict, peer: str | None) -> None:
    header = ["shape", "batch", "ours tok/s", "matmul roofline"]
    header += ["mamba_ssm tok/s", "speed vs mamba_ssm"] if peer else ["stored mamba_ssm tok/s"]
    header += ["err vs ref"]
    rows, sources = [], set()
    for shape, entry in results["shapes"].items():
        for r in entry["runs"]:
            row = [shape, f"B={r['batch']},L={r['length']}", f"{r['tokens_per_s']:.0f}",
                   None if r["roofline_share"] is None else f"{r['roofline_share']:.1%}"]
            if peer:
                row += [f"{r['peer_tokens_per_s']:.0f}", f"{r['speed_vs_peer']:.2f}x"]
            else:
                stored = r.get("stored_peer_tokens_per_s")
                row += [None if stored is None else f"{stored:.0f}"]
                sources.add(r.get("stored_source"))
            rows.append(row + [f"{entry['rel_err_vs_ref']:.1e}"])
    print("\n" + format_table(header, rows))
    for label in sorted(sources - {None}):
        print(label)
    for shape, entry in results["shapes"].items():
        if "cold_start" in entry:
            cs = entry["cold_start"]
            print(f"cold start {shape}: first forward {cs['cold_first_forward_s']:.1f} s with an empty Triton cache "
                  f"({cs['cold_process_s']:.1f} s process), {cs['warm_first_forward_s']:.1f} s with the cache filled")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--no-cold-start", action="store_true")
    ap.add_argument("--peer", choices=["auto", "off"], default="auto",
                    help="auto: time mamba_ssm's model in the same run when it imports")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="toy sizes on the CPU: checks the script, not the speed")
    ap.add_argument("--first-forward", help=argparse.SUPPRESS)
    args = ap.parse_args()
    shapes = [s for s in args.shapes.split(",") if s]
    if any(s not in SHAPES for s in shapes):
        ap.error(f"unknown shapes in {args.shapes!r}; known: {', '.join(SHAPES)}")
    if args.tiny:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are first imported, below
        device, dtype, args.batches, args.reps = torch.device("cpu"), torch.float32, TINY_BATCHES, 1
    elif not torch.cuda.is_available():
        print("bench_model.py needs a CUDA GPU (or --tiny for a CPU check of the script)", file=sys.stderr)
        return 2
    else:
        device, dtype, args.batches = torch.device("cuda"), torch.bfloat16, BATCHES
    if args.first_forward:
        first_forward(args.first_forward)
        return 0
    mamba_ssm = import_peer("mamba_ssm") if args.peer == "auto" and device.type == "cuda" else None
    peer = f"mamba_ssm {mamba_ssm.__version__}" if mamba_ssm else None
    info = run_info(device, with_peaks=True)
    results = {**info, "peer": peer, "shapes": {}}
    for shape in shapes:
        results["shapes"][shape] = bench_shape(shape, args, device, dtype, mamba_ssm, info["gpu"])
    print_table(results, peer)
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
