"""The output folder of a batch: its layout, each unit's state, the per-checkpoint lock, result
files put in place atomically, and the status file with the progress lines.

The layout of ``OUTPUT`` is the package docstring's.

A ``<task>.json`` is lm-eval's own results file with a ``"mamba_eval_batch"`` record (task,
settings, fingerprint): the unit is done when that file parses, has results and carries the
expected fingerprint. Every file appears by ``os.replace`` of a complete, fsynced file in the same
folder; temporary names start with ``.`` and contain ``.tmp-`` (removed by the next run).

Top-level imports are the standard library only.
"""

from __future__ import annotations

import os
import secrets
import shutil
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from mamba_eval.utils import atomic_move, atomic_write, atomic_write_json, read_json

PROG = "mamba-eval batch"
STATUS_FILE = "batch.json"
CHECKPOINT_FILE = "checkpoint.json"
LOCK_FILE = ".lock"
WORKER_LOG = "worker.log"
SPEC_FILE = ".worker-spec.json"
#: The key of a result file that records how batch made it (task, settings, fingerprint).
RESULT_KEY = "mamba_eval_batch"


def utc_now() -> str:
    """The time now, UTC, to the second (``2024-05-01T12:00:00Z``)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------------------- files


def result_path(folder, task: str) -> Path:
    return Path(folder) / f"{task}.json"


def error_path(folder, task: str) -> Path:
    return Path(folder) / f"{task}.error"


def clean_temp(folder: Path) -> None:
    """Remove what an interrupted writer left: temporary files and staging folders."""
    for tmp in Path(folder).glob(".*.tmp-*"):
        try:
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()
        except OSError:
            pass


def staging_dir(folder: Path, task: str) -> Path:
    """A new, private folder inside ``folder`` where lm-eval's writer puts one task's files
    before :func:`publish` moves them into place (same file system, so the move is a rename)."""
    path = Path(folder) / f".{task}.tmp-{os.getpid()}-{secrets.token_hex(3)}"
    path.mkdir()
    return path


def publish(written: Path, target: Path) -> None:
    """Move a complete file that lm-eval's writer made to ``target`` atomically."""
    atomic_move(written, target)


def write_errors(folder: Path, tasks, message: str) -> None:
    """Record ``message`` as the one-line error of each of ``tasks``."""
    for task in tasks:
        atomic_write(error_path(folder, task), message.strip() + "\n")


def error_text(folder: Path, task: str) -> str:
    try:
        return error_path(folder, task).read_text(encoding="utf-8").strip() or "failed"
    except OSError:
        return "not finished"


def last_line(path: Path) -> str:
    """The last non-empty line of a log, for an error message that points at it."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 4096))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return f"see {path}"
    return f"last output: {lines[-1][:300]}" if lines else f"no output; see {path}"


# ------------------------------------------------------------------------------- units


def unit_state(folder, task: str, fingerprint: str) -> str:
    """``"done"``, ``"stale"`` (finished with other settings) or ``"missing"`` (absent or unreadable)."""
    data = read_json(result_path(folder, task))
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict) or not data["results"]:
        return "missing"
    record = data.get(RESULT_KEY)
    if not isinstance(record, dict) or record.get("fingerprint") != fingerprint:
        return "stale"
    return "done"


def stale_detail(folder: Path, task: str, settings: dict) -> str:
    """Why a finished result is stale: the settings that differ, in a few words."""
    data = read_json(result_path(folder, task)) or {}
    record = data.get(RESULT_KEY)
    if not isinstance(record, dict):
        return "made outside mamba-eval batch"
    old = record.get("settings") or {}
    keys = sorted(set(old) | set(settings))
    changed = [f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in keys if old.get(k) != settings.get(k)]
    return ", ".join(changed) if changed else "other model or model_args"


def _eval_seconds(path: Path) -> float | None:
    data = read_json(path) or {}
    try:
        return float(data.get("total_evaluation_time_seconds"))
    except (TypeError, ValueError):
        return None


# ------------------------------------------------------------------------------- locking


def try_lock(path: Path):
    """An exclusive, non-blocking lock on ``path`` (an open fd), or None if another process holds it."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): no protection against concurrent runs
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def note_lock(fd: int, text: str) -> None:
    """Say in the lock file who holds it (shown to a second run that finds it locked)."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, text.encode(), 0)


# ------------------------------------------------------------------------------- status


def count_states(states: dict) -> dict:
    """How many units are in each state: ``{"done": 3, "failed": 1}``."""
    out: dict[str, int] = {}
    for state in states.values():
        out[state] = out.get(state, 0) + 1
    return out


class Progress:
    """Unit states, one stderr line per finished or failed unit, and the status file."""

    def __init__(self, output: Path, jobs: list, states: dict, stream, executor: str):
        self.output, self.jobs, self.stream, self.executor = output, {j.slug: j for j in jobs}, stream, executor
        self.states = states  # (slug, task) -> state
        self.errors: dict = {}
        self.start = time.monotonic()
        self.started_at = utc_now()
        self.previously_done = sum(1 for s in states.values() if s == "done")
        self.lock = threading.Lock()
        self.job_ids: dict[str, str] = {}

    def elapsed(self) -> str:
        seconds = int(time.monotonic() - self.start)
        return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"

    def _line(self, text: str) -> None:
        counts = self.counts()
        total = len(self.states)
        print(f"{PROG}: [{counts.get('done', 0)}/{total} done, {counts.get('failed', 0)} failed, {self.elapsed()}] "
              f"{text}", file=self.stream, flush=True)

    def note(self, text: str) -> None:
        """One progress line that is not a unit's final state (e.g. a worker started again)."""
        with self.lock:
            self._line(text)

    def counts(self) -> dict:
        return count_states(self.states)

    def set(self, slug: str, task: str, state: str, error: str | None = None) -> None:
        with self.lock:
            if self.states.get((slug, task)) == state:
                return
            self.states[(slug, task)] = state
            if error:
                self.errors[(slug, task)] = error
            name = self.jobs[slug].name
            if state == "done":
                seconds = _eval_seconds(result_path(self.jobs[slug].folder, task))
                self._line(f"{name} {task}: done" + (f" in {seconds:.1f} s" if seconds is not None else ""))
            elif state == "failed":
                self._line(f"{name} {task}: FAILED: {error}")
            elif state == "busy":
                self._line(f"{name} {task}: skipped, {error}")
            self.write_status()

    def poll(self, slugs) -> None:
        """Pick up results and errors that workers of ``slugs`` have written since the last poll."""
        for slug in slugs:
            job = self.jobs[slug]
            folder = Path(job.folder)
            for task in job.tasks:
                if self.states[(slug, task)] in ("done", "failed"):
                    continue
                if result_path(folder, task).exists() and unit_state(folder, task, job.fingerprints[task]) == "done":
                    self.set(slug, task, "done")
                elif error_path(folder, task).exists():
                    self.set(slug, task, "failed", error_text(folder, task))

    def finish(self, summary: dict) -> None:
        """Take the final states of one checkpoint from ``run_checkpoint``'s summary."""
        slug = summary["slug"]
        for task in self.jobs[slug].tasks:
            if task in summary["done"]:
                self.set(slug, task, "done")
            elif summary.get("busy"):
                if self.states[(slug, task)] != "done":
                    self.set(slug, task, "busy", summary["busy"])
            elif task in summary["failed"]:
                self.set(slug, task, "failed", summary["failed"][task])

    def crash(self, slug: str, message: str) -> None:
        """Every unfinished unit of ``slug`` failed with ``message`` (its process or job died)."""
        for task in self.jobs[slug].tasks:
            if self.states[(slug, task)] not in ("done", "failed"):
                self.set(slug, task, "failed", message)

    def write_status(self) -> None:
        checkpoints = []
        for slug, job in self.jobs.items():
            units = {}
            for task in job.tasks:
                unit = {"state": self.states[(slug, task)]}
                if (slug, task) in self.errors and unit["state"] != "done":
                    unit["error"] = self.errors[(slug, task)]
                units[task] = unit
            entry = {"slug": slug, "name": job.name, "pretrained": job.pretrained, "units": units}
            if slug in self.job_ids:
                entry["job_id"] = self.job_ids[slug]
            checkpoints.append(entry)
        status = {
            "format": 1, "executor": self.executor, "started": self.started_at, "updated": utc_now(),
            "elapsed_s": round(time.monotonic() - self.start, 1),
            "counts": {"total": len(self.states), **self.counts()},
            "previously_done": self.previously_done, "checkpoints": checkpoints,
        }
        atomic_write_json(self.output / STATUS_FILE, status)
