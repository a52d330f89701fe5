"""What the start-up hook costs every Python process.

Two fresh virtual environments of the same interpreter, identical but for one file: the second
holds mamba-eval's ``mamba_eval_hook.pth``. ``python -c pass`` runs alternately in both, and the
medians of the wall times are compared. (The hook's line only defines a finder; mamba_eval itself
is not needed for this measurement.)

    python scripts/bench_startup.py [--runs 100] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

HOOK = Path(__file__).resolve().parent.parent / "mamba_eval" / "mamba_eval_hook.pth"


def make_venv(root: Path, with_hook: bool) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    if with_hook:
        shutil.copy(HOOK, Path(purelib) / HOOK.name)
    return python


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pythons = {"without": make_venv(Path(tmp) / "a", False), "with": make_venv(Path(tmp) / "b", True)}
        times = {k: [] for k in pythons}
        for _ in range(5):  # warm the file cache
            for python in pythons.values():
                subprocess.run([str(python), "-c", "pass"], check=True)
        for _ in range(args.runs):
            for key, python in pythons.items():
                t0 = time.perf_counter()
                subprocess.run([str(python), "-c", "pass"], check=True)
                times[key].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    result = {"python": sys.version.split()[0], "platform": sysconfig.get_platform(), "runs": args.runs,
              "median_ms_without_hook": med["without"], "median_ms_with_hook": med["with"],
              "added_ms": med["with"] - med["without"]}
    print(f"python -c pass, median of {args.runs}: {med['without']:.2f} ms without the hook, "
          f"{med['with']:.2f} ms with it (+{med['with'] - med['without']:.2f} ms)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
