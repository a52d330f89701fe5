"""Train the probe model (a tiny Mamba-2 on multi-query associative recall) on the CPU.

The default settings are those of the model ``mamba-eval probe`` trains into its cache on first
use (``mamba_eval.commands.probe_model.default_probe_model``); this script writes one into a folder of your
choice and prints the training time and the held-out accuracy at the training length, then
(``--lengths``) at longer lengths, computed directly on token ids.

    python scripts/train_probe_model.py --out runs/probe_model [--steps 1200] [--seed 0] [--threads 1]
    mamba-eval probe --model_args pretrained=runs/probe_model      # the report over lengths
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> int:
    from mamba_eval.commands.probe_model import TRAIN_VERSION, TrainConfig

    defaults = TrainConfig()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="checkpoint folder to write")
    ap.add_argument("--steps", type=int, default=defaults.steps)
    ap.add_argument("--batch-size", type=int, default=defaults.batch_size)
    ap.add_argument("--lr", type=float, default=defaults.lr)
    ap.add_argument("--length", type=int, default=defaults.length, help="training length in tokens")
    ap.add_argument("--max-pairs", type=int, default=defaults.max_pairs)
    ap.add_argument("--seed", type=int, default=defaults.seed)
    ap.add_argument("--threads", type=int, default=defaults.threads,
                    help=f"torch threads (default {defaults.threads}; 0: torch's own default)")
    ap.add_argument("--eval-samples", type=int, default=defaults.eval_samples)
    ap.add_argument("--lengths", default="", help="also report held-out accuracy at these lengths, e.g. 1024,4096")
    args = ap.parse_args()

    import os

    from mamba_eval.models.checkpoint import load_model
    from mamba_eval.commands.probe_model import evaluate_recall, train_probe_model

    config = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, length=args.length, max_pairs=args.max_pairs,
        seed=args.seed, threads=args.threads or None, eval_samples=args.eval_samples,
    )
    load = os.getloadavg()
    record = train_probe_model(args.out, config)
    record["load_average_at_start"] = [round(x, 2) for x in load]
    if args.lengths:
        model = load_model(args.out)
        record["heldout_accuracy_by_length"] = {}
        for length in [int(x) for x in args.lengths.split(",") if x.strip()]:
            t = time.perf_counter()
            acc = {str(p): evaluate_recall(model, length, p, args.eval_samples // 4, seed=args.seed)
                   for p in config.eval_pairs}
            record["heldout_accuracy_by_length"][str(length)] = acc
            print(f"length {length}: {acc}  ({time.perf_counter() - t:.0f} s)", flush=True)
    print(json.dumps({"train_version": TRAIN_VERSION, **record}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
