"""Train the probe model (a tiny Mamba-2 on multi-query associative recall) on the CPU.

The default settings are those of the model shipped in the package
(``mamba_eval/commands/probe_checkpoint``, the offline default of ``mamba-eval probe``). Training
is deterministic (fixed seeds, one torch thread, fp32 on the CPU), so this regenerates it, in
about 4-5 minutes on an idle 2-core machine:

    python scripts/train_probe_model.py --out mamba_eval/commands/probe_checkpoint

``--check`` trains into a temporary folder and compares every file with the shipped ones (the
record's ``"run"`` aside: time, torch version, processor); exit status 1 if any differs. A torch
version or a processor other than the recorded ones may round differently and differ in the
last bits. Other settings train a model of your own and print its held-out accuracy at the
training length, then (``--lengths``) at longer lengths, computed directly on token ids:

    python scripts/train_probe_model.py --out runs/probe_model --seed 1 --lengths 1024,4096
    mamba-eval probe --model_args pretrained=runs/probe_model      # the report over lengths
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    from mamba_eval.commands.probe_model import TRAIN_VERSION, TrainConfig

    defaults = TrainConfig()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="checkpoint folder to write")
    where.add_argument("--check", action="store_true",
                       help="retrain with the defaults and compare with the shipped model's files")
    ap.add_argument("--steps", type=int, default=defaults.steps)
    ap.add_argument("--batch-size", type=int, default=defaults.batch_size)
    ap.add_argument("--lr", type=float, default=defaults.lr)
    ap.add_argument("--length", type=int, default=defaults.length, help="training length in tokens")
    ap.add_argument("--max-pairs", type=int, default=defaults.max_pairs)
    ap.add_argument("--seed", type=int, default=defaults.seed)
    ap.add_argument("--threads", type=int, default=defaults.threads,
                    help=f"torch threads (default {defaults.threads}; 0: torch's own default, not reproducible)")
    ap.add_argument("--eval-samples", type=int, default=defaults.eval_samples)
    ap.add_argument("--lengths", default="", help="also report held-out accuracy at these lengths, e.g. 1024,4096")
    args = ap.parse_args()

    from mamba_eval.commands.probe_model import SHIPPED_DIR, evaluate_recall, train_probe_model
    from mamba_eval.models.checkpoint import load_model

    config = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, length=args.length, max_pairs=args.max_pairs,
        seed=args.seed, threads=args.threads or None, eval_samples=args.eval_samples,
    )
    if (args.check or Path(args.out).resolve() == SHIPPED_DIR) and config != defaults:
        ap.error("the shipped model is trained with the default settings; give no training options")
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            train_probe_model(tmp, config)
            return _compare(Path(tmp), SHIPPED_DIR)

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
    record.pop("losses")
    print(json.dumps({"train_version": TRAIN_VERSION, **record}, indent=2))
    return 0


def _compare(new: Path, shipped: Path) -> int:
    """Print whether each file of ``new`` equals the shipped one; 0 if all do."""
    from mamba_eval.commands.probe_model import RECORD_FILE

    names = sorted({p.name for p in new.iterdir()} | {p.name for p in shipped.iterdir()})
    differ = []
    for name in names:
        a, b = new / name, shipped / name
        if not (a.is_file() and b.is_file()):
            same = False
        elif name == RECORD_FILE:
            same = _without_run(a) == _without_run(b)
        else:
            same = a.read_bytes() == b.read_bytes()
        print(f"{'same' if same else 'DIFFERENT':9} {name}")
        if not same:
            differ.append(name)
    if differ:
        print(f"the retrained probe model differs from {shipped} in {', '.join(differ)}")
        return 1
    print(f"the retrained probe model is identical to {shipped}")
    return 0


def _without_run(path: Path) -> dict:
    record = json.loads(path.read_text())
    record.pop("run", None)
    return record


if __name__ == "__main__":
    sys.exit(main())
