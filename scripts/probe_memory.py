"""Passkey probe at 16K and 1M tokens on one GPU: peak memory and time per length.

For each shape (random-init weights at a published size, written once as a mamba_ssm-format
checkpoint into --workdir), runs ``mamba-eval probe --family passkey`` (``mamba_eval.commands.probe``)
with ``batch_size=1`` over --lengths and prints a table of the measured peak GPU memory
(``torch.cuda.max_memory_allocated`` during each length's evaluation, weights included) and the
time per length; writes JSON (--json) and each shape's full probe report under --out.

Random weights score the passkey at chance; the point here is that memory stays flat as the
context grows from 16K to 1M tokens (the state, not a cache, carries the context).

    python scripts/probe_memory.py --shapes mamba-130m --lengths 16k,1m --json probe_memory_130m.json
    python scripts/probe_memory.py --shapes mamba-2.8b --lengths 16k,1m --json probe_memory_2.8b.json

The tokenizer is GPT-NeoX-20B from ``$MAMBA_EVAL_DATA_DIR/tokenizers/gpt-neox-20b`` (or
--tokenizer); without one the demo's byte-level BPE tokenizer is generated (lengths are counted
in whichever tokenizer is used, so memory figures are comparable).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import run_info, write_json  # noqa: E402

# Published shapes (mamba_eval.models.releases).
SHAPES = ("mamba-130m", "mamba-2.8b", "mamba2-130m", "mamba2-2.7b")


def write_checkpoint(shape: str, folder: Path, dtype: str) -> Path:
    """config.json (the release's, in ``dtype``) + model.safetensors with random weights (reused when
    already written)."""
    import torch

    from mamba_eval.models.releases import release, write_random_checkpoint

    if (folder / "model.safetensors").is_file():
        return folder
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return write_random_checkpoint(folder, release(shape, torch_dtype=dtype), dtype=getattr(torch, dtype),
                                   device=device, safetensors=True)


def default_tokenizer(workdir: Path) -> str:
    data = os.environ.get("MAMBA_EVAL_DATA_DIR", str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    neox = Path(data) / "tokenizers" / "gpt-neox-20b"
    if (neox / "tokenizer.json").is_file():
        return str(neox)
    from mamba_eval.commands.demo import build_tokenizer

    folder = workdir / "demo_tokenizer"
    if not (folder / "tokenizer.json").is_file():
        build_tokenizer(folder)
    print(f"no GPT-NeoX tokenizer under {neox}; using the demo tokenizer {folder}", file=sys.stderr)
    return str(folder)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="mamba-130m,mamba-2.8b", help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--lengths", default="16k,1m")
    ap.add_argument("--family", default="passkey", choices=["passkey", "passkey_gen"])
    ap.add_argument("--depths", default="0.5")
    ap.add_argument("--samples", type=int, default=2, help="documents per depth and length")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--workdir", default="/tmp/probe_memory", help="where the random checkpoints are written")
    ap.add_argument("--out", default="runs/probe_memory", help="probe reports, one folder per shape")
    ap.add_argument("--json", default=None, help="write the table here")
    ap.add_argument("--model_args", default="", help="extra model_args, e.g. backend=ref")
    args = ap.parse_args()

    import torch

    from mamba_eval.commands.probe import run_probe

    if not torch.cuda.is_available():
        print("probe_memory.py measures GPU memory and needs a CUDA GPU", file=sys.stderr)
        return 2
    workdir = Path(args.workdir)
    tokenizer = args.tokenizer or default_tokenizer(workdir)
    rows, report = [], {**run_info("cuda"), "dtype": args.dtype, "family": args.family, "tokenizer": tokenizer,
                        "shapes": {}}
    for shape in [s.strip() for s in args.shapes.split(",") if s.strip()]:
        if shape not in SHAPES:
            print(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}", file=sys.stderr)
            return 2
        t0 = time.perf_counter()
        folder = write_checkpoint(shape, workdir / shape, args.dtype)
        write_s = time.perf_counter() - t0
        model_args = {"pretrained": str(folder), "tokenizer": tokenizer, "dtype": args.dtype}
        for item in filter(None, args.model_args.split(",")):
            key, _, value = item.partition("=")
            model_args[key] = value
        results = run_probe(
            args.family, model_args=model_args, lengths=args.lengths, depths=args.depths, samples=args.samples,
            device="cuda", batch_size=1, out=Path(args.out) / shape,
        )
        report["shapes"][shape] = {"checkpoint_write_seconds": round(write_s, 1),
                                   "model_load_seconds": results["model_load_seconds"], "tasks": results["tasks"]}
        for t in results["tasks"]:
            metric = "acc" if args.family == "passkey" else "exact_match"
            rows.append((shape, t["length_name"], t.get("context_tokens_max"), t["n_docs"],
                         t["peak_memory"]["peak_bytes"], t["peak_memory"].get("reserved_bytes"),
                         t["data_seconds"], t["eval_seconds"], (t.get("metrics") or {}).get(metric), t["status"]))
        del results
        torch.cuda.empty_cache()

    print(f"\n{'shape':<12} {'length':>7} {'tokens':>8} {'docs':>4} {'peak alloc GiB':>15} {'reserved GiB':>13} "
          f"{'data s':>7} {'eval s':>8} {'acc':>6}  status")
    for shape, name, tokens, docs, peak, reserved, data_s, eval_s, acc, status in rows:
        gib = (lambda b: f"{b / 2 ** 30:.2f}" if b is not None else "n/a")
        acc_text = f"{acc:.3f}" if isinstance(acc, float) else "-"
        print(f"{shape:<12} {name:>7} {tokens or '-':>8} {docs:>4} {gib(peak):>15} {gib(reserved):>13} "
              f"{data_s:>7} {eval_s:>8} {acc_text:>6}  {status}")
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
