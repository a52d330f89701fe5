"""``mamba-eval batch`` as a command and as a library call: ``add_subcommand`` (the arguments),
``run_batch`` (plan, check for stale results, run on an executor, report) and ``BatchResult``.

Top-level imports are the standard library only: the CLI must start fast.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mamba_eval.commands.batch.executors import SlurmOptions, local_slots, parse_minutes, run_local, run_submitit
from mamba_eval.commands.batch.plan import expand_checkpoints, parse_model_args, plan_jobs, read_manifest
from mamba_eval.commands.batch.store import (
    PROG, WORKER_LOG, Progress, count_states, error_path, stale_detail, unit_state,
)
from mamba_eval.errors import MambaEvalError
from mamba_eval.utils import DATA_DIR_ENV, data_dir_from_env


@dataclass
class BatchResult:
    """What a batch ended with: per unit ``(slug, task) -> state`` and the failures' errors."""

    output: Path
    states: dict  # (slug, task) -> "done" | "failed" | "busy" | "pending" | "submitted"
    errors: dict  # (slug, task) -> one-line error
    names: dict  # slug -> label
    previously_done: int = 0
    jobs: list = field(default_factory=list)  # submitit job ids, when submitted

    @property
    def ok(self) -> bool:
        return all(s == "done" for s in self.states.values())

    @property
    def counts(self) -> dict:
        return count_states(self.states)


def run_batch(checkpoints, tasks, output, *, model: str = "mamba", model_args=None, lm_eval_args=(),
              data_dir: str | None = None, executor: str = "local", workers: int | None = None,
              gpus: str = "auto", gpus_per_checkpoint: int = 1, slurm: SlurmOptions | None = None,
              wait: bool = True, redo_stale: bool = False, dry_run: bool = False, stream=None) -> BatchResult:
    """Evaluate ``checkpoints`` (``Checkpoint``s) on ``tasks``, writing into ``output``.

    ``lm_eval_args``: flags of ``lm-eval run`` applied to every unit (``--batch_size 64``,
    ``--limit 4``, ``--num_fewshot 0``, ...). ``data_dir``: a local data folder for the offline
    tasks (``mamba_eval.harness.offline``). See the package docstring for executors and resuming.
    Returns a ``BatchResult``; bad input raises ``MambaEvalError`` before anything runs.
    """
    stream = stream or sys.stderr
    if executor not in ("local", "slurm", "submitit-local"):
        raise MambaEvalError(f"unknown executor {executor!r} (local, slurm, submitit-local)")
    if gpus_per_checkpoint < 1:
        raise MambaEvalError("--gpus-per-checkpoint must be at least 1")
    include_path = None
    if data_dir:
        from mamba_eval.harness.offline import prepare_offline_tasks

        try:
            include_path = str(prepare_offline_tasks(data_dir))
        except (FileNotFoundError, ValueError) as e:
            raise MambaEvalError(f"--data-dir {data_dir}: {e}") from None
    output = Path(output).resolve()
    jobs = plan_jobs(checkpoints, tasks, output, model=model, model_args=model_args, lm_eval_args=lm_eval_args,
                     include_path=include_path)

    states: dict = {}
    stale = []
    for job in jobs:
        for task in job.tasks:
            state = unit_state(job.folder, task, job.fingerprints[task])
            if state == "stale":
                stale.append((job, task))
            states[(job.slug, task)] = "done" if state == "done" else "pending"
    if stale and not redo_stale:
        shown = "; ".join(f"{Path(j.folder).name}/{t}.json ({stale_detail(Path(j.folder), t, j.settings)})"
                          for j, t in stale[:5])
        more = f" and {len(stale) - 5} more" if len(stale) > 5 else ""
        raise MambaEvalError(f"{len(stale)} finished result(s) in {output} were made with other settings: "
                             f"{shown}{more}; rerun with --redo-stale to replace them, or use another --output folder")

    todo = [job for job in jobs if any(states[(job.slug, t)] != "done" for t in job.tasks)]
    names = {job.slug: job.name for job in jobs}
    n_done = sum(1 for s in states.values() if s == "done")
    if dry_run:
        for job in jobs:
            for task in job.tasks:
                print(f"{job.slug}\t{task}\t{states[(job.slug, task)]}\t{job.pretrained}", file=stream)
        return BatchResult(output, states, {}, names, n_done)

    slots = local_slots(gpus, gpus_per_checkpoint, workers) if executor == "local" and todo else []
    output.mkdir(parents=True, exist_ok=True)
    for job in todo:  # errors of earlier attempts are not this run's
        for task in job.tasks:
            if states[(job.slug, task)] != "done":
                error_path(job.folder, task).unlink(missing_ok=True)
    progress = Progress(output, jobs, states, stream, executor)
    progress.write_status()
    total = len(states)
    where = ""
    if slots:
        where = (f" on {len(slots)} worker(s) with GPUs {', '.join(','.join(s) for s in slots)}"
                 if slots[0] is not None else f" on {len(slots)} CPU worker(s)")
    elif todo:
        where = f" as {len(todo)} {executor} job(s)"
    n_ckpt, n_task = len(jobs), len(jobs[0].tasks)
    print(f"{PROG}: {total} units ({n_ckpt} checkpoint{'s' * (n_ckpt != 1)} x {n_task} task{'s' * (n_task != 1)}): "
          f"{n_done} already done, "
          f"{total - n_done} to run{where}; results in {output}", file=stream, flush=True)

    if todo:
        if executor == "local":
            run_local(todo, slots, gpus_per_checkpoint, progress)
        else:
            submitted = run_submitit(todo, executor, output, gpus_per_checkpoint, slurm, progress, wait)
            if not wait:
                for job in todo:
                    for task in job.tasks:
                        if states[(job.slug, task)] != "done":
                            states[(job.slug, task)] = "submitted"
                progress.write_status()
                print(f"{PROG}: submitted {len(submitted)} job(s) ({', '.join(submitted)}); rerun the same command "
                      "to see progress and resume", file=stream, flush=True)
                return BatchResult(output, states, progress.errors, names, n_done, submitted)
    progress.write_status()
    result = BatchResult(output, states, progress.errors, names, n_done)
    _report(result, progress, stream)
    return result


def _report(result: BatchResult, progress: Progress, stream) -> None:
    counts = result.counts
    total = len(result.states)
    print(f"{PROG}: finished in {progress.elapsed()}: {counts.get('done', 0)} of {total} units done "
          f"({result.previously_done} before this run), {counts.get('failed', 0)} failed"
          + (f", {counts['busy']} skipped (locked by another run)" if counts.get("busy") else ""),
          file=stream, flush=True)
    by_error: dict = {}
    for (slug, task), state in result.states.items():
        if state != "done":
            by_error.setdefault((slug, result.errors.get((slug, task), state)), []).append(task)
    for (slug, error), tasks in by_error.items():
        print(f"{PROG}: FAILED {result.names[slug]} [{slug}] ({', '.join(tasks)}): {error}", file=stream, flush=True)
    if by_error:
        print(f"{PROG}: logs in {result.output}/<slug>/{WORKER_LOG}; rerun the same command to retry what is not done",
              file=stream, flush=True)


_DESCRIPTION = """\
Evaluate many checkpoints on many tasks with lm-eval, resumably. Each (checkpoint, task)
result is lm-eval's result JSON at OUTPUT/<slug>/<task>.json, written atomically; a rerun of
the same command skips finished work. Unknown flags are lm-eval 'run' flags applied to every
evaluation (e.g. --batch_size 64 --limit 100 --num_fewshot 0).

examples:
  mamba-eval batch --checkpoints '/ckpts/run1/step-*' state-spaces/mamba-130m --tasks hellaswag,piqa -o runs/b1
  mamba-eval batch --manifest ckpts.yaml --tasks lambada_openai,hellaswag -o runs/b1 --batch_size 64
  mamba-eval batch --manifest ckpts.yaml --tasks hellaswag -o /shared/runs/b1 \\
      --executor slurm --slurm-partition gpu --slurm-time 4:00:00 --slurm-array-parallelism 16

manifest (YAML or JSON; .txt: one checkpoint per line):
  model_args: dtype=bfloat16            # optional, for every entry
  checkpoints:
    - /ckpts/run2/final                 # a path, glob or hub id
    - pretrained: /ckpts/run3/step-1000
      name: run3-1k                     # label in tables
      model_args: {dtype: float32}      # overrides the common ones
      n_parameters: 129135360           # for tables, when results cannot tell
"""


def add_subcommand(subparsers) -> None:
    """Add ``batch`` to the ``mamba-eval`` command's subparsers (unknown flags pass to lm-eval)."""
    parser = subparsers.add_parser(
        "batch",
        help="evaluate many checkpoints on many tasks, resumably, on all GPUs or a SLURM cluster",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    # An option, not a positional: argparse would take the value of an lm-eval flag given after
    # the checkpoints ("--limit 4") for one more checkpoint.
    parser.add_argument("--checkpoints", nargs="+", action="extend", default=[], metavar="CKPT",
                        help="checkpoint folders, glob patterns (quote them) or hub ids; repeatable")
    parser.add_argument("--manifest", metavar="FILE", action="append", default=[],
                        help="YAML/JSON/.txt file listing checkpoints (with per-checkpoint model_args); repeatable")
    parser.add_argument("--tasks", "-t", action="append", default=[], metavar="T1,T2",
                        help="lm-eval task names (comma-separated; repeatable)")
    parser.add_argument("--output", "-o", required=True, metavar="DIR", help="results folder")
    parser.add_argument("--model", default="mamba", help="lm-eval model name (default: mamba)")
    parser.add_argument("--model_args", default=None, metavar="ARGS",
                        help="model_args for every checkpoint ('key=value,...' or JSON), e.g. dtype=bfloat16")
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help=f"local data folder for the offline tasks (default: ${DATA_DIR_ENV}; empty: off)")
    parser.add_argument("--executor", choices=("local", "slurm", "submitit-local"), default="local",
                        help="where units run (default: local)")
    parser.add_argument("--gpus", default="auto", metavar="LIST",
                        help="local GPUs to use: auto (default), none, or ids such as 0,1,3")
    parser.add_argument("--gpus-per-checkpoint", type=int, default=1, metavar="K",
                        help="GPUs per checkpoint; K > 1 runs it data parallel with accelerate launch")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="concurrent local workers (default: one per GPU group, or 1 on the CPU)")
    parser.add_argument("--redo-stale", action="store_true",
                        help="replace finished results that were made with other lm-eval settings")
    parser.add_argument("--dry-run", action="store_true", help="list the units and their states; run nothing")
    parser.add_argument("--no-wait", action="store_true",
                        help="slurm/submitit-local: return after submitting (rerun to follow up)")
    group = parser.add_argument_group("slurm (with --executor slurm; through submitit)")
    group.add_argument("--slurm-partition", default=None, metavar="NAME")
    group.add_argument("--slurm-time", default="24:00:00", metavar="TIME",
                       help="time limit per array task: minutes or [D-]HH:MM[:SS] (default: 24:00:00)")
    group.add_argument("--slurm-cpus-per-task", type=int, default=None, metavar="N")
    group.add_argument("--slurm-mem-gb", type=float, default=None, metavar="GB")
    group.add_argument("--slurm-array-parallelism", type=int, default=None, metavar="N",
                       help="array tasks running at once (default: all)")
    group.add_argument("--slurm-account", default=None, metavar="NAME")
    group.add_argument("--slurm-qos", default=None, metavar="NAME")
    group.add_argument("--slurm-constraint", default=None, metavar="NAME")
    group.add_argument("--slurm-setup", action="append", default=[], metavar="LINE",
                       help="shell line run before each job, e.g. 'source ~/venv/bin/activate'; repeatable")
    group.add_argument("--slurm-param", action="append", default=[], metavar="KEY=VALUE",
                       help="any other sbatch parameter (e.g. reservation=abc); repeatable")
    parser.set_defaults(handler=_main, passthrough=True)


def _main(args: argparse.Namespace, extra: list[str]) -> int:
    if args.workers is not None and args.workers < 1:
        raise MambaEvalError("--workers must be at least 1")
    model_args = parse_model_args(args.model_args)
    checkpoints = expand_checkpoints(args.checkpoints, model_args={})
    for manifest in args.manifest:
        checkpoints += read_manifest(manifest, model_args=model_args)
    if not checkpoints:
        raise MambaEvalError("no checkpoints: give --checkpoints (folders, globs, hub ids) or --manifest FILE")
    additional = {}
    for item in args.slurm_param:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MambaEvalError(f"--slurm-param {item!r}: expected KEY=VALUE")
        additional[key.strip()] = value.strip()
    slurm = SlurmOptions(
        partition=args.slurm_partition, time_min=parse_minutes(args.slurm_time),
        cpus_per_task=args.slurm_cpus_per_task, mem_gb=args.slurm_mem_gb,
        array_parallelism=args.slurm_array_parallelism, account=args.slurm_account, qos=args.slurm_qos,
        constraint=args.slurm_constraint, setup=tuple(args.slurm_setup), additional=additional,
    )
    data_dir = args.data_dir if args.data_dir is not None else str(data_dir_from_env() or "")
    if data_dir and any(a == "--include_path" or a.startswith("--include_path=") for a in extra):
        if args.data_dir is not None:
            raise MambaEvalError("--data-dir and --include_path cannot be combined")
        print(f"{PROG}: ignoring ${DATA_DIR_ENV}={data_dir} because --include_path is given", file=sys.stderr)
        data_dir = ""
    try:
        result = run_batch(
            checkpoints, args.tasks, args.output, model=args.model, model_args=model_args, lm_eval_args=extra,
            data_dir=data_dir or None, executor=args.executor, workers=args.workers, gpus=args.gpus,
            gpus_per_checkpoint=args.gpus_per_checkpoint, slurm=slurm, wait=not args.no_wait,
            redo_stale=args.redo_stale, dry_run=args.dry_run,
        )
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; finished results are kept, rerun the same command to resume", file=sys.stderr)
        return 130
    if args.dry_run or args.no_wait:
        return 0
    return 0 if result.ok else 1


