"""What the benchmark scripts share: the GPU's name and measured peaks, timing, the commit, peers, JSON.

Peaks: ``PEAKS`` is one table keyed by the GPU's name, holding the bf16 matmul rate and the device
copy bandwidth measured on that GPU when a run first asks for them (``peaks()``). Every roofline
share divides by the peaks of the GPU the run is on, never by a figure of another chip. A run
measures them once: they are kept in this process, and in the JSON file that ``MAMBA_EVAL_PEAKS``
names when it is set (``scripts/gpu_check.py`` sets it, so the benchmarks it starts share one
measurement).

The commit: ``git rev-parse HEAD`` and whether tracked files differ from it. The GPU machine gets
the working tree without ``.git``; there the stamp that ``scripts/gpu_check.py --prepare`` wrote
on the CPU machine (the commit and the git hash of every tracked file) stands in for git, and the
dirty flag is recomputed from the files' contents.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
PEAKS_ENV = "MAMBA_EVAL_PEAKS"
STAMP = REPO / "runs" / "gpu_check" / "stamp.json"


@dataclasses.dataclass(frozen=True)
class Peaks:
    matmul_flops: float  # bf16 dense matmul, FLOP/s
    copy_bytes_per_s: float  # device-to-device copy, bytes read + bytes written per second


#: Measured peaks by GPU name (``torch.cuda.get_device_name()``).
PEAKS: dict[str, Peaks] = {}


def gpu_name() -> str | None:
    """The name of this process's CUDA device, or None without one."""
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def peaks(gpu: str | None = None) -> Peaks:
    """The peaks of ``gpu`` (default: this process's GPU), measured on first use."""
    name = gpu or gpu_name()
    if name is None:
        raise RuntimeError("roofline shares need a GPU's measured peaks, and no GPU is visible")
    if name not in PEAKS:
        PEAKS.update(_read_peaks_file())
    if name not in PEAKS:
        if name != gpu_name():
            raise KeyError(f"no measured peaks for {name!r} (known: {', '.join(sorted(PEAKS)) or 'none'})")
        PEAKS[name] = measure_peaks()
        _write_peaks_file()
    return PEAKS[name]


def matmul_share(flop_per_s: float, gpu: str | None = None) -> float:
    """A rate of matmul FLOPs as a share of the GPU's measured bf16 matmul peak."""
    return flop_per_s / peaks(gpu).matmul_flops


def _read_peaks_file() -> dict[str, Peaks]:
    path = os.environ.get(PEAKS_ENV)
    if not path or not os.path.isfile(path):
        return {}
    return {name: Peaks(**fields) for name, fields in json.loads(Path(path).read_text()).items()}


def _write_peaks_file() -> None:
    path = os.environ.get(PEAKS_ENV)
    if path:
        write_json(path, {**{k: dataclasses.asdict(v) for k, v in _read_peaks_file().items()},
                          **{k: dataclasses.asdict(v) for k, v in PEAKS.items()}})


def measure_peaks(n: int = 8192, copy_bytes: int = 2**30, reps: int = 20) -> Peaks:
    """bf16 ``n x n x n`` matmul FLOP/s and the copy bandwidth of ``copy_bytes``, medians of ``reps``."""
    import torch

    device = torch.device("cuda")
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b, c = torch.randn_like(a), torch.empty_like(a)
    matmul_s = median_seconds(lambda: torch.matmul(a, b, out=c), reps=reps, warmup=3, device=device)
    src = torch.empty(copy_bytes // 4, device=device).uniform_()
    dst = torch.empty_like(src)
    copy_s = median_seconds(lambda: dst.copy_(src), reps=reps, warmup=3, device=device)
    return Peaks(matmul_flops=2 * n**3 / matmul_s, copy_bytes_per_s=2 * copy_bytes / copy_s)


def median_seconds(fn: Callable[[], object], *, reps: int = 5, warmup: int = 1, device=None) -> float:
    """Median wall time of ``reps`` calls of ``fn`` after ``warmup`` calls; on a CUDA device
    between events recorded around each call, so that all the work the call queued is counted."""
    import torch

    cuda = device is not None and torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ------------------------------------------------------------------------------------ the commit


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout


def _in_git_checkout() -> bool:
    try:
        return Path(_git("rev-parse", "--show-toplevel").strip()).resolve() == REPO
    except (OSError, subprocess.CalledProcessError):
        return False


def _blob_hash(path: Path) -> str | None:
    """git's object name of the file's contents (None when the file is gone)."""
    if path.is_symlink():
        data = os.readlink(path).encode()
    elif path.is_file():
        data = path.read_bytes()
    else:
        return None
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def write_stamp(path: Path = STAMP) -> dict:
    """Record HEAD and the hash of every tracked file at HEAD, for ``commit()`` where git is absent."""
    files = {}
    for line in _git("ls-tree", "-r", "HEAD").splitlines():
        meta, name = line.split("\t", 1)
        _, kind, sha = meta.split()
        if kind == "blob":
            files[name] = sha
    stamp = {"commit": _git("rev-parse", "HEAD").strip(), "files": files}
    write_json(path, stamp)
    return stamp


def commit() -> tuple[str | None, bool | None]:
    """``(commit, dirty)``: dirty when a tracked file differs from the commit; ``(None, None)``
    when neither git nor a stamp says."""
    stamp = json.loads(STAMP.read_text()) if STAMP.is_file() else None
    stamp_dirty = stamp is not None and any(_blob_hash(REPO / name) != sha for name, sha in stamp["files"].items())
    # The stamp first: the GPU machine's copy of the tree may carry a .git of an older commit.
    if stamp is not None and not stamp_dirty:
        return stamp["commit"], False
    if _in_git_checkout():
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no").strip())
        return _git("rev-parse", "HEAD").strip(), dirty
    if stamp is not None:
        return stamp["commit"], True
    return None, None


# ------------------------------------------------------------------------------------ peers


def import_peer(name: str):
    """The peer package ``name`` (mamba_ssm, causal_conv1d) when it imports here, else None; the
    reason goes to stderr. torch comes first: the peers' extensions link against it."""
    import importlib

    import torch  # noqa: F401

    try:
        return importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - any failure means: not measured in this run
        print(f"peer {name} not importable ({type(exc).__name__}: {exc}); not measured", file=sys.stderr)
        return None


def peer_versions() -> dict[str, str | None]:
    """Which peers this process can measure, with their versions."""
    found = {}
    for name in ("mamba_ssm", "causal_conv1d"):
        module = import_peer(name)
        found[name] = getattr(module, "__version__", "unknown") if module else None
    return found


# ------------------------------------------------------------------------------------ output


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def run_info(device=None, with_peaks: bool = False) -> dict:
    """Where and when a benchmark ran: GPU, commit, date, versions; the GPU's peaks ``with_peaks``."""
    import torch

    sha, dirty = commit()
    info = {"gpu": gpu_name(), "commit": sha, "dirty": dirty, "date": utc_now(), "torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if with_peaks and info["gpu"] and (device is None or torch.device(device).type == "cuda"):
        info["peaks"] = dataclasses.asdict(peaks())
    return info


def write_json(path, obj) -> None:
    """Write ``obj`` as JSON; the file appears whole (a cut run leaves the previous one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def format_table(header: list[str], rows: list[list]) -> str:
    """Left-aligned text columns; None prints as '-'."""
    cells = [[str(h) for h in header]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)
