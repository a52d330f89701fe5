"""GPU benchmark of cached generation (``mamba_eval.harness.generation.generate``), ms per generated token.

Prompt 128 tokens, 256 new tokens (no EOS, no stop strings, greedy), batch 1 and 64, random-init
bf16 models of the published shapes on the triton backend, beside mamba_ssm's ``generate(cg=True)``
figures (anchors.md, one H200). Three ways: eager (no CUDA graphs), CUDA graphs with the host looking
at the tokens after every step, and CUDA graphs with ``GREEDY_STEPS`` greedy steps per replay (the
default), and the last again with the SSM states stored in bf16 between steps
(``state_dtype``; mamba_ssm's cache keeps them in the model's dtype, ours defaults to fp32). The
time per token is the whole ``generate`` call (prefill and decoding) divided by 256,
after a first call that compiles the kernels and captures the graphs (runners are reused across
calls, as mamba_ssm reuses its captured graph); the capture of a fresh runner is timed on its own.
Needs CUDA (exits 2 without).

    python scripts/bench_generate.py --json bench_generate.json [--shapes mamba-130m] [--batches 1,64]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import SHAPES  # noqa: E402

from mamba_eval.models.releases import release_config  # noqa: E402

# mamba_ssm generate(cg=True) on one H200, ms per generated token (anchors.md, Decode table).
ANCHORS = {
    "mamba-130m": {1: 0.71, 64: 0.82},
    "mamba-2.8b": {1: 3.18, 64: 4.68},
    "mamba2-130m": {1: 0.53, 64: 1.23},
    "mamba2-2.7b": {1: 2.94, 64: 9.60},
}
PROMPT, NEW = 128, 256


def bench(model, batch: int, cuda_graphs: bool, greedy_steps: int, repeats: int = 3,
          state_dtype: torch.dtype = torch.float32) -> dict:
    from mamba_eval.harness.generation import DecodeRunner, generate

    prompts = torch.randint(2, 50000, (batch, PROMPT)).tolist()
    dev = torch.device("cuda")
    kw = dict(batch_size=batch, device=dev, cuda_graphs=cuda_graphs, greedy_steps=greedy_steps,
              state_dtype=state_dtype)
    generate(model, prompts, max_new_tokens=4, **kw)  # compile, capture
    times, outs = [], None
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs = generate(model, prompts, max_new_tokens=NEW, **kw)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if any(len(o) != NEW for o in outs):
        raise RuntimeError(f"expected {NEW} tokens per row, got {sorted({len(o) for o in outs})}")
    capture = None
    if cuda_graphs:
        t0 = time.perf_counter()
        DecodeRunner(model, batch, cuda_graphs=True, greedy_steps=greedy_steps, state_dtype=state_dtype).capture()
        torch.cuda.synchronize()
        capture = time.perf_counter() - t0
    return {"ms_per_token": 1e3 * sorted(times)[len(times) // 2] / NEW, "capture_s": capture, "tokens": outs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(ANCHORS), help=f"comma-separated, of {', '.join(ANCHORS)}")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--no-eager", action="store_true", help="skip the (slow) eager runs")
    ap.add_argument("--batch-invariant", action="store_true",
                    help="the batch-invariant model (as --model mamba builds it): decoding steps through "
                         "kernels.matmul.linear_step, never the fused Mamba-1 step")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_generate.py needs a CUDA GPU (none found)", file=sys.stderr)
        return 2
    from mamba_eval.models.model import LanguageModel

    shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in ANCHORS or s not in SHAPES]
    if unknown:
        ap.error(f"unknown shapes {unknown}; known: {', '.join(ANCHORS)}")
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    from mamba_eval.harness.generation import GREEDY_STEPS

    print(f"{'shape':<12} {'batch':>5} {'eager':>7} {'graphs,1':>8} {f'graphs,{GREEDY_STEPS}':>8} "
          f"{'bf16 state':>10} {'capture s':>9} {'mamba_ssm':>9}   (ms per token; same tokens)")
    for shape in shapes:
        torch.manual_seed(0)
        model = LanguageModel(release_config(shape), backend="triton", device="cuda",
                                 dtype=torch.bfloat16, batch_invariant=args.batch_invariant).eval()
        for batch in batches:
            eager = None if args.no_eager else bench(model, batch, False, 1, repeats=1)
            single = bench(model, batch, True, 1)
            multi = bench(model, batch, True, GREEDY_STEPS)
            half = bench(model, batch, True, GREEDY_STEPS, state_dtype=torch.bfloat16)
            half.pop("tokens")
            same = (eager.pop("tokens") if eager else multi["tokens"]) == single.pop("tokens") == multi.pop("tokens")
            anchor = ANCHORS[shape].get(batch)
            rows.append({"shape": shape, "batch": batch, "prompt": PROMPT, "new_tokens": NEW,
                         "eager_ms_per_token": eager["ms_per_token"] if eager else None,
                         "graphs_1_step_ms_per_token": single["ms_per_token"],
                         "graphs_ms_per_token": multi["ms_per_token"], "greedy_steps": GREEDY_STEPS,
                         "graphs_bf16_state_ms_per_token": half["ms_per_token"],
                         "capture_s": multi["capture_s"], "same_tokens": same,
                         "anchor_mamba_ssm_cg_ms_per_token": anchor})
            print(f"{shape:<12} {batch:>5} {eager['ms_per_token'] if eager else float('nan'):>7.2f} "
                  f"{single['ms_per_token']:>8.3f} "
                  f"{multi['ms_per_token']:>8.3f} {half['ms_per_token']:>10.3f} {multi['capture_s']:>9.2f} "
                  f"{anchor if anchor is not None else '-':>9}   {'yes' if same else 'NO'}")
        del model
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                               "batch_invariant": args.batch_invariant, "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
