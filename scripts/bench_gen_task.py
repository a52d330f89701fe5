"""Generation through lm-eval itself: long greedy answers, ``--model mamba`` beside lm-eval's
``mamba_ssm`` wrapper and ``--model hf`` on the same weights, in one run on one machine.

The task is ``mamba_gen_long`` (``tasks/bench/``): 128 generated prompts of 60 to 140 words, 256 new
tokens each, a stop string that practically never occurs, so every model decodes the same number of
tokens. For each shape, a random-init checkpoint is written in mamba_ssm's format (read by ``mamba``
and by lm-eval's ``mamba_ssm`` wrapper) and the same tensors in transformers' format (read by
``hf``). Each model runs in a fresh ``lm_eval`` process; the script reports

- whole process: that process's wall time (start-up, model load and task building included);
- generation: the time inside the model's ``generate_until``, the tokens it generated (decoding
  steps times rows for lm-eval's HF-based classes, which decode every row of a batch to the
  batch's longest answer; the answers' own tokens for ours) and tokens per second;
- the answers equal to ``hf``'s, and to ours, counted over the documents (the same greedy
  arithmetic in another implementation: an answer that differs is a near tie resolved the other
  way or a different treatment of padding, and the count shows how often).

The ``mamba_ssm`` wrapper runs when mamba_ssm imports on a CUDA device (``--peers``). Only
figures measured in this run appear; there are no stored ones to compare with.

    python scripts/bench_gen_task.py --json gen_task.json                   # GPU: 130m and 2.8b shapes
    python scripts/bench_gen_task.py --shapes tiny --device cpu --dtype float32 --limit 4 --max-gen-toks 16
    python scripts/bench_gen_task.py --tasks mamba_passkey_gen_4k            # another generation task
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import format_table, import_peer, run_info, write_json  # noqa: E402
from bench_eval import SHAPES, write_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TASKS = REPO / "tasks" / "bench"
DEFAULT_TASK = "mamba_gen_long"
MODELS = ("mamba", "mamba_ssm", "hf")


def write_hf_copy(ckpt: Path, out: Path) -> Path:
    """The tensors of the mamba_ssm-format ``ckpt`` in transformers' Mamba format (tied LM head)."""
    import torch
    from safetensors.torch import save_file
    from transformers import MambaConfig

    raw = json.loads((ckpt / "config.json").read_text())
    if raw.get("ssm_cfg", {}).get("layer", "Mamba1") != "Mamba1" or not raw.get("tie_embeddings", True):
        raise SystemExit("bench_gen_task.py: the hf copy is written for tied Mamba-1 shapes only")
    state = torch.load(ckpt / "pytorch_model.bin", map_location="cpu", weights_only=True)
    vocab = state["backbone.embedding.weight"].shape[0]
    out.mkdir(parents=True, exist_ok=True)
    MambaConfig(vocab_size=vocab, hidden_size=raw["d_model"], num_hidden_layers=raw["n_layer"],
                tie_word_embeddings=True, pad_token_id=0, bos_token_id=0, eos_token_id=0).save_pretrained(out)
    tensors = {k.replace("backbone.embedding.", "backbone.embeddings."): v.contiguous()
               for k, v in state.items() if k != "lm_head.weight"}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def lm_eval_argv(args, model: str, checkpoint: Path, tokenizer: Path, task: str, out_dir: Path) -> list[str]:
    model_args = f"pretrained={checkpoint},tokenizer={tokenizer},dtype={args.dtype}"
    if model == "mamba" and args.batch_invariant is not None:
        model_args += f",batch_invariant={args.batch_invariant}"
    argv = ["lm_eval", "--model", model, "--model_args", model_args, "--tasks", task,
            "--include_path", str(TASKS), "--batch_size", str(args.batch_size), "--device", args.device,
            "--output_path", str(out_dir), "--log_samples"]
    if args.limit is not None:
        argv += ["--limit", str(args.limit)]
    if args.max_gen_toks is not None:
        argv += ["--gen_kwargs", f"max_gen_toks={args.max_gen_toks}"]
    return argv


def child(spec_path: str) -> int:
    """One lm_eval process: time ``generate_until`` and count the tokens it generated."""
    spec = json.loads(Path(spec_path).read_text())
    import torch

    if spec["model"] == "mamba":
        from mamba_eval.harness.lm import MambaLM as model_cls
    elif spec["model"] == "mamba_ssm":
        from lm_eval.models.mamba_lm import MambaLMWrapper as model_cls
    else:
        from lm_eval.models.huggingface import HFLM as model_cls
    timing = {"generation_s": 0.0, "generated_tokens": 0, "requests": 0}
    original_gen = model_cls.generate_until

    def timed_generate(self, requests, disable_tqdm: bool = False):
        stats_before = getattr(self, "generation_stats", None)
        before = stats_before.generated_tokens if stats_before is not None else 0
        start = time.perf_counter()
        try:
            return original_gen(self, requests, disable_tqdm=disable_tqdm)
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            timing["generation_s"] += time.perf_counter() - start
            timing["requests"] += len(requests)
            if stats_before is not None:  # ours counts each answer's own tokens
                timing["generated_tokens"] += self.generation_stats.generated_tokens - before

    model_cls.generate_until = timed_generate
    if spec["model"] != "mamba":
        original_model_generate = model_cls._model_generate

        def counted_model_generate(self, context, *a, **k):
            out = original_model_generate(self, context, *a, **k)
            timing["generated_tokens"] += (out.shape[1] - context.shape[1]) * out.shape[0]
            return out

        model_cls._model_generate = counted_model_generate
    from lm_eval.__main__ import cli_evaluate

    sys.argv = spec["argv"]
    cli_evaluate()
    samples = sorted(glob.glob(os.path.join(spec["out_dir"], "**", "samples_*.jsonl"), recursive=True))
    answers = {}
    for line in Path(samples[-1]).read_text().splitlines() if samples else []:
        doc = json.loads(line)
        answers[str(doc["doc_id"])] = doc["filtered_resps"][0]
    Path(spec["result"]).write_text(json.dumps({**timing, "answers": answers}))
    return 0


def run_one(args, shape: str, model: str, checkpoint: Path, tokenizer: Path, task: str, work: Path) -> dict:
    out_dir = work / f"out-{shape}-{model}-{task}"
    spec = {"model": model, "argv": lm_eval_argv(args, model, checkpoint, tokenizer, task, out_dir),
            "out_dir": str(out_dir), "result": str(work / f"result-{shape}-{model}-{task}.json")}
    spec_path = work / f"spec-{shape}-{model}-{task}.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", str(spec_path)], env=env, capture_output=True,
                          text=True)
    whole = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"bench_gen_task.py: lm_eval --model {model} on {shape} failed (exit {proc.returncode}):\n"
                         f"{(proc.stdout + proc.stderr)[-4000:]}")
    result = json.loads(Path(spec["result"]).read_text())
    tokens, seconds = result["generated_tokens"], result["generation_s"]
    return {"shape": shape, "task": task, "model": model, "whole_process_s": whole, **result,
            "tokens_per_s": tokens / seconds if seconds > 0 else None,
            "ms_per_token": 1e3 * seconds / tokens if tokens else None, "argv": spec["argv"]}


def agreement(rows: list[dict]) -> None:
    """Per row: how many answers equal those of hf and of ours (same shape and task)."""
    for r in rows:
        for other, key in (("hf", "same_as_hf"), ("mamba", "same_as_ours")):
            ref = next((o for o in rows if o["shape"] == r["shape"] and o["task"] == r["task"]
                        and o["model"] == other), None)
            if ref is not None and ref is not r:
                same = sum(r["answers"].get(d) == a for d, a in ref["answers"].items())
                r[key] = f"{same}/{len(ref['answers'])}"


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        return child(sys.argv[2])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="mamba-130m,mamba-2.8b", help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--tasks", default=DEFAULT_TASK, help="comma-separated generation tasks")
    ap.add_argument("--models", default=",".join(MODELS),
                    help="comma-separated, of mamba, mamba_ssm (needs mamba_ssm and CUDA), hf")
    ap.add_argument("--data-dir", default=os.environ.get("MAMBA_EVAL_DATA_DIR", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch-size", default="64")
    ap.add_argument("--batch-invariant", choices=["true", "false"], default=None, help="ours (default: its default)")
    ap.add_argument("--limit", type=int, default=None, help="documents per task")
    ap.add_argument("--max-gen-toks", type=int, default=None, help="override the task's new tokens per answer")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    tokenizer = Path(args.data_dir) / "tokenizers" / "gpt-neox-20b"
    if not (tokenizer / "tokenizer.json").is_file():
        ap.error(f"no tokenizer at {tokenizer} (set --data-dir or MAMBA_EVAL_DATA_DIR)")
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = sorted(set(shapes) - set(SHAPES))
    models = [m for m in args.models.split(",") if m]
    if unknown or set(models) - set(MODELS):
        ap.error(f"unknown shape or model: {', '.join(unknown + sorted(set(models) - set(MODELS)))}")
    if "mamba_ssm" in models and not (args.device.startswith("cuda") and import_peer("mamba_ssm")):
        print("mamba_ssm is not importable here (or the device is not CUDA): its wrapper is left out", flush=True)
        models.remove("mamba_ssm")
    info = {**run_info(args.device), "device": args.device, "dtype": args.dtype, "batch_size": args.batch_size,
            "models": models}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_gen_task.") as tmp:
        work = Path(tmp)
        for shape in shapes:
            ckpt = write_checkpoint(work / shape, shape, args.device)
            hf_ckpt = write_hf_copy(ckpt, work / f"{shape}-hf") if "hf" in models else None
            for task in (t for t in args.tasks.split(",") if t):
                for model in models:
                    row = run_one(args, shape, model, hf_ckpt if model == "hf" else ckpt, tokenizer, task, work)
                    rows.append(row)
                    print(f"{shape} {task} {model}: whole {row['whole_process_s']:.1f} s, generation "
                          f"{row['generation_s']:.2f} s, {row['generated_tokens']} tokens", flush=True)
    agreement(rows)
    header = ["shape", "task", "model", "whole process s", "generation s", "requests", "generated tokens", "tok/s",
              "ms/token", "same answers as hf", "same answers as ours"]
    print(format_table(header, [[r["shape"], r["task"], r["model"], f"{r['whole_process_s']:.1f}",
                                 f"{r['generation_s']:.2f}", r["requests"], r["generated_tokens"],
                                 None if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f}",
                                 None if r["ms_per_token"] is None else f"{r['ms_per_token']:.3f}",
                                 r.get("same_as_hf"), r.get("same_as_ours")] for r in rows]))
    if args.json:
        write_json(args.json, {**info, "rows": [{k: v for k, v in r.items() if k != "answers"} for r in rows]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
