"""GPU benchmark of cached generation (``mamba_eval.harness.generation.generate``), ms per generated token.

Prompt 128 tokens, 256 new tokens (no EOS, no stop strings, greedy), batch 1 and 64, random-init
bf16 models of the published shapes on the triton backend. Three ways: eager (no CUDA graphs),
CUDA graphs with the host looking at the tokens after every step, and CUDA graphs with
``GREEDY_STEPS`` greedy steps per replay (the default), and the last again with the SSM states
stored in bf16 between steps (``state_dtype``; mamba_ssm's cache keeps them in the model's dtype,
ours defaults to fp32). The time per token is the whole ``generate`` call (prefill and decoding)
divided by 256, after a first call that compiles the kernels and captures the graphs (runners are
reused across calls, as mamba_ssm reuses its captured graph); the capture of a fresh runner is
timed on its own.

When mamba_ssm imports, its ``generate(cg=True)`` (``mamba_ssm.utils.generation``) runs the same
prompts on its own random-init model of the same shape in the same run, timed the same way (the
first call captures its graph), and the table shows its ms per token and our speed over it.
Without it, the figure stored in ``scripts/anchors.py`` is shown in a column of its own, with no
ratio. Needs CUDA (exits 2 without), or ``--tiny``: toy sizes on the CPU, eager only.

    python scripts/bench_generate.py --json bench_generate.json [--shapes mamba-130m] [--batches 1,64]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import anchors  # noqa: E402
from bench_common import format_table, import_peer, median_seconds, run_info, write_json  # noqa: E402
from bench_model import SHAPES, model_config, peer_model, shape_config  # noqa: E402

PROMPT, NEW = 128, 256
TINY_PROMPT, TINY_NEW = 8, 6


def make_prompts(batch: int, prompt: int, seed: int = 0) -> list[list[int]]:
    """The prompts of one (shape, batch) row: every way of decoding it gets the same ones, so that
    their tokens can be compared (each drawing its own would compare different prompts)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(2, 50000, (batch, prompt), generator=gen).tolist()


def bench(model, prompts: list[list[int]], device, cuda_graphs: bool, greedy_steps: int, repeats: int = 3,
          state_dtype: torch.dtype = torch.float32, new: int = NEW) -> dict:
    from mamba_eval.harness.generation import DecodeRunner, generate

    batch = len(prompts)
    kw = dict(batch_size=batch, device=device, cuda_graphs=cuda_graphs, greedy_steps=greedy_steps,
              state_dtype=state_dtype)
    generate(model, prompts, max_new_tokens=4, **kw)  # compile, capture
    outs = []

    def run():
        outs[:] = generate(model, prompts, max_new_tokens=new, **kw)

    seconds = median_seconds(run, reps=repeats, warmup=0, device=device)
    if any(len(o) != new for o in outs):
        raise RuntimeError(f"expected {new} tokens per row, got {sorted({len(o) for o in outs})}")
    capture = None
    if cuda_graphs:
        t0 = time.perf_counter()
        DecodeRunner(model, batch, cuda_graphs=True, greedy_steps=greedy_steps, state_dtype=state_dtype).capture()
        torch.cuda.synchronize()
        capture = time.perf_counter() - t0
    return {"ms_per_token": 1e3 * seconds / new, "capture_s": capture, "tokens": outs}


@torch.inference_mode()
def bench_peer(model, batch: int, device, repeats: int = 3) -> float:
    """ms per token of mamba_ssm's ``generate(cg=True)``, greedy, the whole call over NEW."""
    prompts = torch.randint(2, 50000, (batch, PROMPT), device=device)

    def run():
        out = model.generate(input_ids=prompts, max_length=PROMPT + NEW, cg=True, top_k=1)
        if out.shape[1] != PROMPT + NEW:
            raise RuntimeError(f"mamba_ssm generated {out.shape[1] - PROMPT} tokens, expected {NEW}")

    # The first call captures the graph for this batch and length; the timed calls replay it.
    return 1e3 * median_seconds(run, reps=repeats, warmup=1, device=device) / NEW


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--no-eager", action="store_true", help="skip the (slow) eager runs")
    ap.add_argument("--batch-invariant", action="store_true",
                    help="the batch-invariant model (as --model mamba builds it): decoding steps through "
                         "kernels.matmul.linear_step, never the fused Mamba-1 step")
    ap.add_argument("--peer", choices=["auto", "off"], default="auto",
                    help="auto: time mamba_ssm's generate(cg=True) in the same run when it imports")
    ap.add_argument("--tiny", action="store_true", help="toy sizes on the CPU, eager only: checks the script")
    args = ap.parse_args()
    shapes = [s for s in args.shapes.split(",") if s]
    if any(s not in SHAPES for s in shapes):
        ap.error(f"unknown shapes in {args.shapes!r}; known: {', '.join(SHAPES)}")
    batches = [int(b) for b in args.batches.split(",")]
    if args.tiny:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are first imported, below
        device, dtype, lengths = torch.device("cpu"), torch.float32, dict(prompt=TINY_PROMPT, new=TINY_NEW)
    elif not torch.cuda.is_available():
        print("bench_generate.py needs a CUDA GPU (or --tiny for a CPU check of the script)", file=sys.stderr)
        return 2
    else:
        device, dtype, lengths = torch.device("cuda"), torch.bfloat16, dict(prompt=PROMPT, new=NEW)
    from mamba_eval.harness.generation import GREEDY_STEPS
    from mamba_eval.models.model import LanguageModel

    mamba_ssm = import_peer("mamba_ssm") if args.peer == "auto" and not args.tiny else None
    info = run_info(device)
    rows = []
    for shape in shapes:
        raw = shape_config(shape, args.tiny)
        torch.manual_seed(0)
        model = LanguageModel(model_config(raw), backend="triton", device=device, dtype=dtype,
                              batch_invariant=args.batch_invariant).eval()
        for batch in batches:
            prompts = make_prompts(batch, lengths["prompt"])
            eager = None if args.no_eager else bench(model, prompts, device, False, 1, repeats=1, new=lengths["new"])
            row = {"shape": shape, "batch": batch, "prompt": lengths["prompt"], "new_tokens": lengths["new"],
                   "greedy_steps": GREEDY_STEPS,
                   "eager_ms_per_token": eager["ms_per_token"] if eager else None}
            if device.type == "cuda":
                single = bench(model, prompts, device, True, 1)
                multi = bench(model, prompts, device, True, GREEDY_STEPS)
                half = bench(model, prompts, device, True, GREEDY_STEPS, state_dtype=torch.bfloat16)
                tokens = [single["tokens"], multi["tokens"]] + ([eager["tokens"]] if eager else [])
                row.update(graphs_1_step_ms_per_token=single["ms_per_token"],
                           graphs_ms_per_token=multi["ms_per_token"],
                           graphs_bf16_state_ms_per_token=half["ms_per_token"], capture_s=multi["capture_s"],
                           same_tokens=all(t == tokens[0] for t in tokens))
            rows.append(row)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if mamba_ssm is not None:
            torch.manual_seed(0)
            peer = peer_model(mamba_ssm, raw, device)
            for row in rows[-len(batches):]:
                row["peer_ms_per_token"] = bench_peer(peer, row["batch"], device)
                row["speed_vs_peer"] = row["peer_ms_per_token"] / row["graphs_ms_per_token"]
            del peer
            torch.cuda.empty_cache()
        elif not args.tiny:  # stored figures are for the published shapes, not the toy ones
            for row in rows[-len(batches):]:
                found = anchors.stored("gen", (shape, row["batch"]), info["gpu"])
                if found:
                    row["stored_peer_ms_per_token"], source = found
                    row["stored_source"] = source.label
    peer = f"mamba_ssm {mamba_ssm.__version__}" if mamba_ssm else None
    print_table(rows, peer)
    if args.json:
        write_json(args.json, {**info, "peer": peer, "batch_invariant": args.batch_invariant, "results": rows})
    return 0


def print_table(rows: list[dict], peer: str | None) -> None:
    from mamba_eval.harness.generation import GREEDY_STEPS

    def ms(value):
        return None if value is None else f"{value:.3f}"

    header = ["shape", "batch", "eager", "graphs,1", f"graphs,{GREEDY_STEPS}", "bf16 state", "capture s",
              "same tokens"]
    header += ["mamba_ssm cg", "speed vs mamba_ssm"] if peer else ["stored mamba_ssm cg"]
    lines = []
    for r in rows:
        line = [r["shape"], r["batch"], ms(r["eager_ms_per_token"]), ms(r.get("graphs_1_step_ms_per_token")),
                ms(r.get("graphs_ms_per_token")), ms(r.get("graphs_bf16_state_ms_per_token")),
                None if r.get("capture_s") is None else f"{r['capture_s']:.2f}",
                {True: "yes", False: "NO", None: None}[r.get("same_tokens")]]
        if peer:
            line += [ms(r["peer_ms_per_token"]), f"{r['speed_vs_peer']:.2f}x"]
        else:
            line += [ms(r.get("stored_peer_ms_per_token"))]
        lines.append(line)
    print("\n" + format_table(header, lines) + "\n(ms per generated token)")
    for label in sorted({r["stored_source"] for r in rows if r.get("stored_source")}):
        print(label)


if __name__ == "__main__":
    sys.exit(main())
