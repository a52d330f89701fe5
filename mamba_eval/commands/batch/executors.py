"""Where checkpoints run: one checkpoint's evaluation process (``run_checkpoint``), local slots
(one per GPU or GPU group, or CPU workers) fed from a queue, and SLURM job arrays through
submitit (``slurm``; ``submitit-local`` runs the same code path with submitit's LocalExecutor).

``run_checkpoint`` is the unit every executor runs: it takes the checkpoint's lock, writes
``checkpoint.json`` and the worker's spec, starts ``python -m mamba_eval.commands.batch --worker``
(through ``accelerate launch`` for K > 1 GPUs) and reports which tasks are done or failed.

Top-level imports are the standard library only.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from mamba_eval.commands.batch.plan import CheckpointJob
from mamba_eval.commands.batch.store import (
    CHECKPOINT_FILE, LOCK_FILE, SPEC_FILE, WORKER_LOG, Progress, clean_temp, error_path, error_text, last_line,
    note_lock, try_lock, unit_state, utc_now,
)
from mamba_eval.commands.batch.worker import PARENT_ENV
from mamba_eval.errors import MambaEvalError, one_line
from mamba_eval.utils import atomic_write, atomic_write_json

#: This package run as a module: the worker (``--worker``) and the launcher guard (``--exec``).
MODULE = "mamba_eval.commands.batch"
_RUNNING: dict[int, subprocess.Popen] = {}  # worker processes started by this process


# ---------------------------------------------------------------------------- one checkpoint


def worker_command(job: CheckpointJob, spec: Path) -> list[str]:
    """The command line of the evaluation process of ``job`` (data parallel when ``processes > 1``)."""
    worker = ["-m", MODULE, "--worker", str(spec)]
    if job.processes <= 1:
        return [sys.executable, *worker]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(job.processes),
              "--num_machines", "1", "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(job.port), *worker]
    return [sys.executable, "-m", MODULE, "--exec", *launch]


def run_checkpoint(job: CheckpointJob) -> dict:
    """Evaluate the unfinished tasks of one checkpoint in a child process; return a summary.

    Holds ``<folder>/.lock`` meanwhile: a second process on the same checkpoint returns at once
    with ``busy`` set. Safe to call again after any interruption. This is also the job function
    submitit runs on a cluster node.
    """
    folder = Path(job.folder)
    folder.mkdir(parents=True, exist_ok=True)
    summary = {"slug": job.slug, "done": [], "failed": {}, "busy": None, "returncode": None, "ran": []}
    lock = try_lock(folder / LOCK_FILE)
    if lock is None:
        holder = (folder / LOCK_FILE).read_text(errors="replace").strip() or "another process"
        summary["busy"] = f"locked by {holder}"
        return summary
    try:
        note_lock(lock, f"pid {os.getpid()} on {socket.gethostname()}")
        clean_temp(folder)
        atomic_write_json(folder / CHECKPOINT_FILE, job.describe())
        pending = [t for t in job.tasks if unit_state(folder, t, job.fingerprints[t]) != "done"]
        summary["ran"] = pending
        for task in pending:
            error_path(folder, task).unlink(missing_ok=True)
        if pending:
            summary["returncode"] = _run_worker_process(job, folder, pending, lock)
            if summary["returncode"] < 0 and job.retry_if_killed:
                summary["killed"] = _signal_name(-summary["returncode"])
                summary["done"] = [t for t in job.tasks if unit_state(folder, t, job.fingerprints[t]) == "done"]
                return summary
            for task in pending:
                if unit_state(folder, task, job.fingerprints[task]) != "done" and not error_path(folder, task).exists():
                    atomic_write(error_path(folder, task),
                                 f"evaluation process exited with status {summary['returncode']} before finishing "
                                 f"this task ({last_line(folder / WORKER_LOG)})\n")
        for task in job.tasks:
            if unit_state(folder, task, job.fingerprints[task]) == "done":
                summary["done"].append(task)
            else:
                summary["failed"][task] = error_text(folder, task)
    finally:
        os.close(lock)
    return summary


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _run_worker_process(job: CheckpointJob, folder: Path, pending: list[str], lock: int) -> int:
    """Start the evaluation process for ``pending`` (output appended to ``worker.log``); its status."""
    spec = folder / SPEC_FILE
    atomic_write_json(spec, {**dataclasses.asdict(job), "tasks": pending})
    env = dict(os.environ)
    env[PARENT_ENV] = str(os.getpid())
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if job.gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(job.gpus)
    if job.threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(var, str(job.threads))
    command = worker_command(job, spec)
    with open(folder / WORKER_LOG, "a", encoding="utf-8") as log:
        log.write(f"\n===== {utc_now()} on {socket.gethostname()}: {' '.join(map(shlex.quote, command))}\n"
                  f"===== tasks: {', '.join(pending)}; CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '')}\n")
        log.flush()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        _RUNNING[proc.pid] = proc
        note_lock(lock, f"pid {os.getpid()} on {socket.gethostname()} (worker pid {proc.pid})")
        try:
            return proc.wait()
        finally:
            _RUNNING.pop(proc.pid, None)


# ------------------------------------------------------------------------------------- local


def detect_gpus(spec: str = "auto") -> list[str]:
    """GPU ids to use: a comma-separated list, ``none``, or ``auto`` (``CUDA_VISIBLE_DEVICES`` if
    set, else ``torch.cuda.device_count()`` asked in a child process, so this process never
    initialises CUDA)."""
    spec = (spec or "auto").strip()
    if spec in ("none", "cpu", ""):
        return []
    if spec != "auto":
        ids = [s.strip() for s in spec.split(",") if s.strip()]
        if not ids:
            raise MambaEvalError(f"--gpus {spec!r}: expected 'auto', 'none' or a list such as 0,1,3")
        return ids
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [] if visible.strip() in ("", "-1") else [v.strip() for v in visible.split(",") if v.strip()]
    env = dict(os.environ, MAMBA_EVAL_DISABLE_HOOK="1")
    try:
        proc = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                              capture_output=True, text=True, timeout=120, env=env)
        count = int(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else 0
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        count = 0
    return [str(i) for i in range(count)]


def local_slots(gpus: str, per_checkpoint: int, workers: int | None) -> list:
    """The local worker slots: a tuple of GPU ids each (``per_checkpoint`` of them), or ``None``
    per CPU worker when there are no GPUs; at most ``workers``."""
    ids = detect_gpus(gpus)
    if ids:
        if len(ids) < per_checkpoint:
            raise MambaEvalError(f"--gpus-per-checkpoint {per_checkpoint} but only {len(ids)} GPU(s): {','.join(ids)}")
        slots = [tuple(ids[i:i + per_checkpoint]) for i in range(0, len(ids) - per_checkpoint + 1, per_checkpoint)]
        return slots[:workers] if workers else slots
    if per_checkpoint > 1:
        raise MambaEvalError("--gpus-per-checkpoint > 1 needs GPUs (none found; see --gpus)")
    return [None] * (workers or 1)


#: How many times a checkpoint whose evaluation process was killed by a signal (out of memory, a
#: lost GPU, an operator's kill) is started again on another slot before its units count as failed.
KILLED_RETRIES = 1


def run_local(jobs: list[CheckpointJob], slots: list, per_checkpoint: int, progress: Progress) -> None:
    """Run ``jobs`` on this machine, one per slot at a time, reporting to ``progress``. A job whose
    evaluation process is killed by a signal goes back to the queue, for another slot when there is
    one, ``KILLED_RETRIES`` times; its finished units are kept."""
    pending: queue.Queue = queue.Queue()  # (job, index of a slot to avoid, or None)
    for job in jobs:
        pending.put((job, None))
    finished: queue.Queue = queue.Queue()
    running: set[str] = set()
    lock = threading.Lock()
    outstanding = [len(jobs)]  # jobs not reported yet: the slots run until it reaches 0
    attempts: dict[str, int] = {}
    n_slots = min(len(slots), len(jobs))
    cpu_threads = None if slots[0] is not None else max(1, (os.cpu_count() or 1) // len(slots))

    def slot_loop(index: int, gpus):
        while True:
            with lock:
                if outstanding[0] == 0:
                    return
            try:
                job, avoid = pending.get(timeout=0.2)
            except queue.Empty:
                continue
            if avoid == index and n_slots > 1:  # killed here: leave it to another slot
                pending.put((job, avoid))
                time.sleep(0.2)
                continue
            with lock:
                attempt = attempts.get(job.slug, 0)
                running.add(job.slug)
            run = dataclasses.replace(job, gpus=gpus, processes=per_checkpoint if gpus is not None else 1,
                                      threads=cpu_threads, port=29500 + index,
                                      retry_if_killed=attempt < KILLED_RETRIES)
            try:
                summary = run_checkpoint(run)
            except Exception as exc:  # noqa: BLE001 - reported as this checkpoint's failure
                outcome = ("crash", (job.slug, one_line(exc)))
            else:
                outcome = ("killed", (summary, gpus)) if summary.get("killed") else ("ok", summary)
            with lock:
                running.discard(job.slug)
                if outcome[0] == "killed":
                    attempts[job.slug] = attempt + 1
                    pending.put((job, index))
                else:
                    outstanding[0] -= 1
                finished.put(outcome)

    threads = [threading.Thread(target=slot_loop, args=(i, gpus), daemon=True, name=f"batch-slot-{i}")
               for i, gpus in enumerate(slots[:n_slots])]
    for thread in threads:
        thread.start()
    try:
        while any(t.is_alive() for t in threads) or not finished.empty():
            with lock:
                slugs = list(running)
            progress.poll(slugs)
            try:
                kind, payload = finished.get(timeout=0.5)
            except queue.Empty:
                continue
            if kind == "killed":
                summary, gpus = payload
                where = f"GPU(s) {','.join(gpus)}" if gpus is not None else "a CPU worker"
                progress.poll([summary["slug"]])
                progress.note(f"{progress.jobs[summary['slug']].name}: evaluation process killed by "
                              f"{summary['killed']} on {where}; its unfinished tasks run again"
                              + (" on another worker" if n_slots > 1 else ""))
                continue
            slug = payload["slug"] if kind == "ok" else payload[0]
            progress.poll([slug])
            if kind == "ok":
                progress.finish(payload)
            else:
                progress.crash(*payload)
    except KeyboardInterrupt:
        for proc in list(_RUNNING.values()):
            proc.kill()
        progress.write_status()
        raise


# -------------------------------------------------------------------------------- submitit


def parse_minutes(text) -> int:
    """Minutes from ``90``, ``HH:MM``, ``HH:MM:SS`` or ``D-HH:MM:SS``."""
    text = str(text).strip()
    match = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d{2})(?::(\d{2}))?", text)
    if match:
        days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
        return max(1, days * 1440 + hours * 60 + minutes + (1 if seconds else 0))
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise MambaEvalError(f"--slurm-time {text!r}: expected minutes or [D-]HH:MM[:SS]")


@dataclass
class SlurmOptions:
    """Cluster settings for ``executor="slurm"`` (submitit parameter names in comments)."""

    partition: str | None = None  # slurm_partition
    time_min: int = 24 * 60  # timeout_min
    cpus_per_task: int | None = None  # cpus_per_task
    mem_gb: float | None = None  # mem_gb
    array_parallelism: int | None = None  # slurm_array_parallelism (default: all tasks at once)
    account: str | None = None  # slurm_account
    qos: str | None = None  # slurm_qos
    constraint: str | None = None  # slurm_constraint
    setup: tuple[str, ...] = ()  # slurm_setup: shell lines run before the job
    additional: dict = field(default_factory=dict)  # slurm_additional_parameters

    def parameters(self, n_jobs: int, gpus_per_job: int) -> dict:
        params = {"timeout_min": self.time_min, "gpus_per_node": gpus_per_job, "tasks_per_node": 1, "nodes": 1,
                  "name": "mamba-eval-batch", "slurm_array_parallelism": self.array_parallelism or n_jobs}
        optional = {"slurm_partition": self.partition, "cpus_per_task": self.cpus_per_task, "mem_gb": self.mem_gb,
                    "slurm_account": self.account, "slurm_qos": self.qos, "slurm_constraint": self.constraint}
        params.update({k: v for k, v in optional.items() if v is not None})
        if self.setup:
            params["slurm_setup"] = list(self.setup)
        if self.additional:
            params["slurm_additional_parameters"] = dict(self.additional)
        return params


def make_executor(kind: str, folder, *, n_jobs: int, gpus_per_job: int, slurm: SlurmOptions | None = None):
    """A submitit executor for ``kind`` ("slurm" or "submitit-local") with the batch's parameters."""
    try:
        import submitit
    except ImportError:
        raise MambaEvalError(f"--executor {kind} needs submitit: pip install 'mamba-eval[slurm]'") from None

    slurm = slurm or SlurmOptions()
    cluster = {"slurm": "slurm", "submitit-local": "local"}[kind]
    try:
        executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    except RuntimeError as e:  # e.g. no srun on this machine
        raise MambaEvalError(f"--executor {kind}: {e}") from None
    executor.update_parameters(**slurm.parameters(n_jobs, gpus_per_job))
    return executor


def run_submitit(jobs, kind, output: Path, per_checkpoint: int, slurm, progress: Progress, wait: bool) -> list[str]:
    """Submit ``jobs`` as one submitit job array; with ``wait``, follow them to the end. The job ids."""
    # submitit's LocalExecutor would give every job the same GPUs: there, jobs inherit this process's.
    gpus_per_job = per_checkpoint if kind == "slurm" else 0
    executor = make_executor(kind, output / ".submitit", n_jobs=len(jobs), gpus_per_job=gpus_per_job, slurm=slurm)
    jobs = [dataclasses.replace(job, processes=per_checkpoint) for job in jobs]
    submitted = executor.map_array(run_checkpoint, jobs)
    for job, sub in zip(jobs, submitted):
        progress.job_ids[job.slug] = str(sub.job_id)
    progress.write_status()
    if not wait:
        return [str(s.job_id) for s in submitted]
    remaining = dict(zip([j.slug for j in jobs], submitted))
    while remaining:
        progress.poll(list(remaining))
        for slug, sub in list(remaining.items()):
            if not sub.done():
                continue
            try:
                summary = sub.result()
            except Exception as exc:  # noqa: BLE001 - the job itself failed (killed, timed out, ...)
                progress.poll([slug])
                progress.crash(slug, f"job {sub.job_id} failed: {one_line(exc)}")
            else:
                progress.poll([slug])
                progress.finish(summary)
            del remaining[slug]
        if remaining:
            time.sleep(0.5)
    return [str(s.job_id) for s in submitted]
