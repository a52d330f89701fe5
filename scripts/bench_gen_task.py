"""An lm-eval generation task with stop strings, end to end through ``--model mamba``, with the
time per generated token.

Runs ``mamba_passkey_gen_<len>`` (greedy generation until "." or a newline, 8 tokens at most; the
probe task registered by the package) through lm-eval's ``simple_evaluate`` on a random-init
checkpoint of a published Mamba-1 shape (``bench_eval.write_checkpoint``: mamba_ssm format, the
real GPT-NeoX-20B tokenizer from the data folder) or on ``--pretrained``, then prints the task's
``exact_match``, the requests, prompt and generated tokens, the generation's wall time (from
``MambaLM.generation_stats``) with its prefill and decoding parts, the ms per generated token overall
and for decoding alone, and writes JSON. Random weights answer at chance; the time is the point.

    python scripts/bench_gen_task.py --shapes mamba-130m,mamba-2.8b --lengths 1k,4k --json gen_task.json
    python scripts/bench_gen_task.py --shapes tiny --device cpu --dtype float32 --lengths 1k --limit 2
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import run_info, write_json  # noqa: E402
from bench_eval import SHAPES, write_checkpoint  # noqa: E402


def run(args, pretrained: str, tokenizer: str, length: str) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from mamba_eval.harness.lm import MambaLM
    from mamba_eval.harness.probe_data import parse_length, required_max_length, task_name

    task = task_name("passkey_gen", parse_length(length))
    model_args = {"pretrained": pretrained, "tokenizer": tokenizer, "dtype": args.dtype, "device": args.device,
                  "batch_size": args.batch_size, "max_length": required_max_length([parse_length(length)])}
    lm = MambaLM(**model_args)
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], limit=args.limit, bootstrap_iters=0,
                                  task_manager=TaskManager(metadata=model_args))
    stats = lm.generation_stats
    return {"task": task, "exact_match": out["results"][task].get("exact_match,none"),
            "requests": stats.requests, "prompt_tokens": stats.prompt_tokens,
            "generated_tokens": stats.generated_tokens, "generation_s": stats.seconds,
            "prefill_s": stats.prefill_seconds, "decode_s": stats.decode_seconds,
            "ms_per_generated_token": stats.ms_per_generated_token,
            "decode_ms_per_generated_token": stats.decode_ms_per_generated_token,
            "evaluate_s": time.perf_counter() - start}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="mamba-130m", help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--pretrained", help="a checkpoint folder or hub id instead of random-init shapes")
    ap.add_argument("--lengths", default="1k", help="context lengths of the passkey task, e.g. 1k,4k")
    ap.add_argument("--data-dir", default=os.environ.get("MAMBA_EVAL_DATA_DIR", str(Path(__file__).resolve().parents[2]
                                                                                     / "shared" / "data")))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch-size", default="64")
    ap.add_argument("--limit", type=int, default=None, help="documents per task")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each task this many times in the process (the first compiles the kernels)")
    args = ap.parse_args()
    tokenizer = Path(args.data_dir) / "tokenizers" / "gpt-neox-20b"
    if not args.pretrained and not (tokenizer / "tokenizer.json").is_file():
        ap.error(f"no tokenizer at {tokenizer} (set --data-dir or MAMBA_EVAL_DATA_DIR)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_gen_task.") as work:
        models = ([(args.pretrained, args.pretrained)] if args.pretrained else
                  [(s, str(write_checkpoint(Path(work) / s, s, args.device))) for s in args.shapes.split(",") if s])
        for name, path in models:
            for length, rep in ((n, r) for n in args.lengths.split(",") for r in range(max(1, args.repeat))):
                row = {"model": name, "repeat": rep, **run(args, path, str(tokenizer), length)}
                rows.append(row)
                per, dec = row["ms_per_generated_token"], row["decode_ms_per_generated_token"]
                print(f"{name:<12} {row['task']:<24} run {rep + 1}  requests {row['requests']:>4}  prompt tokens "
                      f"{row['prompt_tokens']:>8}  generated {row['generated_tokens']:>5}  generation "
                      f"{row['generation_s']:7.2f} s (prefill {row['prefill_s']:7.2f} s, decode "
                      f"{row['decode_s']:7.2f} s)  {per if per is None else round(per, 3)} ms/token  "
                      f"decode {dec if dec is None else round(dec, 3)} ms/token  "
                      f"exact_match {row['exact_match']}", flush=True)
    if args.json:
        write_json(args.json, {**run_info(args.device), "device": args.device, "dtype": args.dtype, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
