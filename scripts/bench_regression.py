"""Before and after: the project's GPU benchmarks for a baseline checkout and this one, in one run
on one machine, with the run-to-run noise, so that a change can be shown not to slow anything.

Three measures, each the baseline's own script against this checkout's own script (each tree is
installed in turn, editable, without dependencies):

- ``eval``: full HellaSwag through ``lm_eval --model mamba`` (``bench_eval.py``): whole process and
  loglikelihood phase, per shape;
- ``model``: model forward with all-position logits, tokens/s (``bench_model.py``);
- ``gen``: cached decoding, ms per generated token (``bench_generate.py --no-eager``).

The trees alternate (base, this, base, this, ...) for ``--repeat`` rounds; the table shows each
figure's median per tree, this tree's median over the base's, and the noise: the spread
(max - min) of the base's repeats over their median. Writes everything as JSON.

    git worktree add .device/before 8dd9773          # on the CPU machine; carry .device and .whl
    python scripts/bench_regression.py --base-dir .device/before --measures eval,model,gen \\
        --shapes mamba-130m,mamba-2.8b --repeat 2 --data-dir .device/data --json bench_regression.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MEASURES = ("eval", "model", "gen")


def install(tree: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", "mamba-eval"], capture_output=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e",
                    str(tree)], check=True)


def run_script(tree: Path, measure: str, args, out: Path) -> dict[str, float]:
    """Run ``tree``'s own benchmark script for ``measure``; its figures as {label: value}."""
    script = {"eval": "bench_eval.py", "model": "bench_model.py", "gen": "bench_generate.py"}[measure]
    cmd = [sys.executable, str(tree / "scripts" / script), "--shapes", args.shapes, "--json", str(out)]
    if measure == "eval":
        cmd += ["--data-dir", args.data_dir, "--work-dir", args.work_dir]
    elif measure == "model":
        cmd += ["--no-cold-start"]
    else:
        cmd += ["--no-eager"]
    # A peer measured beside each tree would cost time and tell nothing about the trees.
    if "--peer" in (tree / "scripts" / script).read_text():
        cmd += ["--peer", "off"]
    log = out.with_suffix(".log")
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=tree, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}")
    data = json.loads(out.read_text())
    figures = {}
    if measure == "eval":
        for r in data["runs"]:
            figures[f"{r['shape']} whole process s"] = r["whole_process_s"]
            figures[f"{r['shape']} loglikelihood s"] = r["loglikelihood_s"]
    elif measure == "model":
        for shape, entry in data["shapes"].items():
            for r in entry["runs"]:
                figures[f"{shape} B={r['batch']} L={r['length']} tok/s"] = r["tokens_per_s"]
    else:
        for r in data["results"]:
            for key in ("graphs_1_step_ms_per_token", "graphs_ms_per_token", "graphs_bf16_state_ms_per_token"):
                figures[f"{r['shape']} batch {r['batch']} {key.removesuffix('_ms_per_token')} ms/token"] = r[key]
    return figures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-dir", required=True, help="a checkout of the baseline (e.g. a git worktree)")
    ap.add_argument("--measures", default=",".join(MEASURES))
    ap.add_argument("--shapes", default="mamba-130m,mamba-2.8b")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--data-dir", default=os.environ.get("MAMBA_EVAL_DATA_DIR", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--work-dir", default=None, help="checkpoints for eval (default: a temporary folder)")
    ap.add_argument("--json", help="write the results here (rewritten after every run, so a cut run keeps its rows)")
    ap.add_argument("--log-dir", help="keep each run's own JSON and log here (default: a temporary folder)")
    args = ap.parse_args()
    measures = [m for m in args.measures.split(",") if m]
    if any(m not in MEASURES for m in measures):
        ap.error(f"--measures takes {', '.join(MEASURES)}")
    trees = {"base": Path(args.base_dir).resolve(), "this": REPO}
    if not (trees["base"] / "scripts").is_dir():
        ap.error(f"{trees['base']} is not a checkout of the project")
    tmp = tempfile.TemporaryDirectory(prefix="bench_regression.")
    args.work_dir = args.work_dir or tmp.name
    log_dir = Path(args.log_dir or tmp.name)
    log_dir.mkdir(parents=True, exist_ok=True)
    figures: dict[str, dict[str, list[float]]] = {"base": {}, "this": {}}
    try:
        for rep in range(args.repeat):
            for label, tree in trees.items():
                install(tree)
                for measure in measures:
                    out = log_dir / f"{label}-{measure}-{rep}.json"
                    for key, value in run_script(tree, measure, args, out).items():
                        figures[label].setdefault(f"{measure}: {key}", []).append(value)
                    print(f"round {rep + 1}: {label} {measure} done", flush=True)
                    report(figures, trees, args, final=False)
    finally:
        install(REPO)
        tmp.cleanup()
    report(figures, trees, args, final=True)
    return 0


def report(figures: dict[str, dict[str, list[float]]], trees: dict[str, Path], args, final: bool) -> None:
    """Rows of figures measured in both trees; printed when ``final``, written to ``--json`` always."""
    rows = []
    for key, base in figures["base"].items():
        this = figures["this"].get(key)
        if not this:
            continue
        b, t = statistics.median(base), statistics.median(this)
        rows.append({"figure": key, "base": base, "this": this, "base_median": b, "this_median": t,
                     "ratio": t / b, "noise": (max(base) - min(base)) / b})
    if args.json:
        Path(args.json).write_text(json.dumps({"base": str(trees["base"]), "repeat": args.repeat, "rows": rows},
                                              indent=1))
    if not final:
        return
    width = max((len(r["figure"]) for r in rows), default=10)
    print(f"\n{'figure':<{width}} {'base':>10} {'this':>10} {'this/base':>9} {'noise':>6}")
    for r in rows:
        print(f"{r['figure']:<{width}} {r['base_median']:>10.4g} {r['this_median']:>10.4g} {r['ratio']:>9.3f} "
              f"{r['noise']:>6.1%}")


if __name__ == "__main__":
    sys.exit(main())
