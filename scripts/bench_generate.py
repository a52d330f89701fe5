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

The transformers-format hybrids of ``bench_eval.py`` (``bamba-9b``, ``zamba2-2.7b``; ``tiny-bamba``
for the CPU) are written once under ``--work-dir`` by transformers' own classes (random init, bf16
safetensors) and loaded by ``mamba_eval.models.load_model``. Their peer is transformers'
``generate`` (greedy, no EOS stop) on the same checkpoint in the same run, one timed call per row
after a short warm-up call; it uses mamba_ssm's and causal_conv1d's kernels when they import. In fp32
(``--tiny``) the two implementations must produce the same tokens, which the table reports.

    python scripts/bench_generate.py --json bench_generate.json [--shapes mamba-130m] [--batches 1,64]
    python scripts/bench_generate.py --shapes bamba-9b --no-eager --work-dir /tmp/ckpts --json hybrid_gen.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import anchors  # noqa: E402
from bench_common import format_table, import_peer, median_seconds, run_info, write_json  # noqa: E402
from bench_eval import HF_SHAPES, write_hf_checkpoint  # noqa: E402
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


@torch.inference_mode()
def bench_hf(model, prompts: list[list[int]], device, new: int) -> dict:
    """ms per token of transformers' greedy ``generate`` on the same prompts, the whole call over
    ``new``; one timed call after a short warm-up (its eager decoding is slow at real sizes)."""
    ids = torch.tensor(prompts, device=device)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    model.generate(ids, max_new_tokens=4, **kw)
    outs = []

    def run():
        outs[:] = model.generate(ids, max_new_tokens=new, **kw)[:, ids.shape[1]:].tolist()

    seconds = median_seconds(run, reps=1, warmup=0, device=device)
    if any(len(o) != new for o in outs):
        raise RuntimeError(f"transformers generated {sorted({len(o) for o in outs})} tokens per row, expected {new}")
    return {"ms_per_token": 1e3 * seconds / new, "tokens": outs}


def hf_peer(folder: Path, device, dtype):
    """transformers' model of a hybrid checkpoint, never stopping at EOS (neither does ours here)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=str(device)).eval()
    model.generation_config.eos_token_id = None
    return model


def build_model(shape: str, args, device, dtype):
    """(our model, its checkpoint folder or None): a hybrid shape is written in transformers' format
    and loaded from it; a Mamba shape is built from its config with torch's random init."""
    from mamba_eval.models.checkpoint import load_model
    from mamba_eval.models.model import LanguageModel

    if shape in HF_SHAPES:
        folder = write_hf_checkpoint(Path(args.work_dir) / shape, shape, str(device))
        model = load_model(folder, dtype=dtype, device=device, backend="triton", batch_invariant=args.batch_invariant)
        return model, folder
    torch.manual_seed(0)
    model = LanguageModel(model_config(shape_config(shape, args.tiny)), backend="triton", device=device, dtype=dtype,
                          batch_invariant=args.batch_invariant).eval()
    return model, None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES),
                    help=f"comma-separated, of {', '.join([*SHAPES, *HF_SHAPES])}")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--no-eager", action="store_true", help="skip the (slow) eager runs")
    ap.add_argument("--batch-invariant", action="store_true",
                    help="the batch-invariant model (as --model mamba builds it): decoding steps through "
                         "kernels.matmul.linear_step, never the fused Mamba-1 step")
    ap.add_argument("--peer", choices=["auto", "off"], default="auto",
                    help="auto: time mamba_ssm's generate(cg=True) (transformers' generate for a hybrid) in the "
                         "same run when it imports")
    ap.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "mamba_eval_bench"),
                    help="where the hybrids' checkpoints are written (and reused)")
    ap.add_argument("--tiny", action="store_true", help="toy sizes on the CPU, eager only: checks the script")
    args = ap.parse_args()
    shapes = [s for s in args.shapes.split(",") if s]
    if any(s not in SHAPES and s not in HF_SHAPES for s in shapes):
        ap.error(f"unknown shapes in {args.shapes!r}; known: {', '.join([*SHAPES, *HF_SHAPES])}")
    if args.tiny and any(s in HF_SHAPES and not s.startswith("tiny-") for s in shapes):
        ap.error("--tiny runs the hybrids' toy shapes only (tiny-bamba)")
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

    peer_on = args.peer == "auto"
    mamba_ssm = import_peer("mamba_ssm") if peer_on and not args.tiny and set(shapes) - set(HF_SHAPES) else None
    info = run_info(device)
    rows = []
    for shape in shapes:
        model, folder = build_model(shape, args, device, dtype)
        shape_rows = []
        for batch in batches:
            prompts = make_prompts(batch, lengths["prompt"])
            eager = None if args.no_eager else bench(model, prompts, device, False, 1, repeats=1, new=lengths["new"])
            row = {"shape": shape, "batch": batch, "prompt": lengths["prompt"], "new_tokens": lengths["new"],
                   "greedy_steps": GREEDY_STEPS,
                   "eager_ms_per_token": eager["ms_per_token"] if eager else None}
            tokens = [eager["tokens"]] if eager else []
            if device.type == "cuda":
                single = bench(model, prompts, device, True, 1)
                multi = bench(model, prompts, device, True, GREEDY_STEPS)
                half = bench(model, prompts, device, True, GREEDY_STEPS, state_dtype=torch.bfloat16)
                tokens = [single["tokens"], multi["tokens"]] + tokens
                row.update(graphs_1_step_ms_per_token=single["ms_per_token"],
                           graphs_ms_per_token=multi["ms_per_token"],
                           graphs_bf16_state_ms_per_token=half["ms_per_token"], capture_s=multi["capture_s"],
                           same_tokens=all(t == tokens[0] for t in tokens))
            shape_rows.append((row, prompts, tokens[0] if tokens else None))
        rows += [r for r, _, _ in shape_rows]
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if folder is not None and peer_on:
            peer = hf_peer(folder, device, dtype)
            for row, prompts, ours in shape_rows:
                found = bench_hf(peer, prompts, device, lengths["new"])
                row["peer"] = "transformers"
                row["peer_ms_per_token"] = found["ms_per_token"]
                fastest = row.get("graphs_ms_per_token") or row["eager_ms_per_token"]
                row["speed_vs_peer"] = found["ms_per_token"] / fastest
                # Equal greedy tokens are expected in fp32 only: bf16 rounding differs between implementations.
                row["same_tokens_as_peer"] = found["tokens"] == ours
            del peer
        elif mamba_ssm is not None and folder is None:
            torch.manual_seed(0)
            peer = peer_model(mamba_ssm, shape_config(shape), device)
            for row, _, _ in shape_rows:
                row["peer"] = "mamba_ssm"
                row["peer_ms_per_token"] = bench_peer(peer, row["batch"], device)
                row["speed_vs_peer"] = row["peer_ms_per_token"] / row["graphs_ms_per_token"]
            del peer
        elif not args.tiny and folder is None:  # stored figures are for the published shapes, not the toy ones
            for row, _, _ in shape_rows:
                found = anchors.stored("gen", (shape, row["batch"]), info["gpu"])
                if found:
                    row["stored_peer_ms_per_token"], source = found
                    row["stored_source"] = source.label
        if device.type == "cuda":
            torch.cuda.empty_cache()
    peer = ", ".join(sorted({peer_label(r["peer"], mamba_ssm) for r in rows if r.get("peer")})) or None
    print_table(rows, peer)
    if args.json:
        write_json(args.json, {**info, "peer": peer, "batch_invariant": args.batch_invariant, "results": rows})
    return 0


def peer_label(name: str, mamba_ssm) -> str:
    if name == "mamba_ssm":
        return f"mamba_ssm {mamba_ssm.__version__}"
    import transformers

    return f"transformers {transformers.__version__}"


def print_table(rows: list[dict], peer: str | None) -> None:
    from mamba_eval.harness.generation import GREEDY_STEPS

    def ms(value):
        return None if value is None else f"{value:.3f}"

    yes_no = {True: "yes", False: "NO", None: None}
    header = ["shape", "batch", "eager", "graphs,1", f"graphs,{GREEDY_STEPS}", "bf16 state", "capture s",
              "same tokens"]
    header += ["peer", "peer ms", "speed vs peer", "same tokens as peer"] if peer else ["stored mamba_ssm cg"]
    lines = []
    for r in rows:
        line = [r["shape"], r["batch"], ms(r["eager_ms_per_token"]), ms(r.get("graphs_1_step_ms_per_token")),
                ms(r.get("graphs_ms_per_token")), ms(r.get("graphs_bf16_state_ms_per_token")),
                None if r.get("capture_s") is None else f"{r['capture_s']:.2f}", yes_no[r.get("same_tokens")]]
        if peer:
            speed = r.get("speed_vs_peer")
            line += [r.get("peer"), ms(r.get("peer_ms_per_token")), None if speed is None else f"{speed:.2f}x",
                     yes_no[r.get("same_tokens_as_peer")]]
        else:
            line += [ms(r.get("stored_peer_ms_per_token"))]
        lines.append(line)
    print("\n" + format_table(header, lines) + "\n(ms per generated token; peer: " + (peer or "none") + ")")
    for label in sorted({r["stored_source"] for r in rows if r.get("stored_source")}):
        print(label)


if __name__ == "__main__":
    sys.exit(main())
