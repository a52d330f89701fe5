"""``mamba-eval batch``: evaluate many checkpoints on many tasks, resumably.

The unit of work is one (checkpoint, task). Its result is lm-eval's result JSON for that task,
at ``OUTPUT/<slug>/<task>.json``; a unit is done when that file exists, parses, and records the
settings it was made with (``"mamba_eval_batch"`` key: task, settings, fingerprint). Every file
is written to a temporary name in the same folder, fsynced and renamed into place
(``os.replace``), so a crash or ``kill -9`` at any point leaves finished results complete and
everything else absent (stale temporary files are removed on the next run). A rerun of the same
command skips finished units and runs the rest; a finished unit made with other lm-eval
settings (``--limit``, ``--num_fewshot``, ...) is *stale*: the run stops and names it unless
``--redo-stale`` is given.

Layout of ``OUTPUT``::

    batch.json                 status: every unit's state and error, counts, elapsed time
    <slug>/checkpoint.json     name, source, model, model_args, n_parameters (for tables)
    <slug>/<task>.json         lm-eval results of one task (complete files only)
    <slug>/<task>.samples.jsonl  with --log_samples: lm-eval's per-document records
                               (a group's subtasks: <task>.<subtask>.samples.jsonl)
    <slug>/<task>.error        one-line error of the last failed attempt
    <slug>/worker.log          the evaluation process's output, appended per attempt
    <slug>/.lock               held while a process evaluates this checkpoint

``<slug>`` is the checkpoint folder's (or hub repository's) name plus 8 hex digits of a hash of
the model name, the resolved path or hub id and the per-checkpoint model_args (device and batch
size excluded): stable across runs and unique (two folders named ``model`` do not collide).

How the work runs: each checkpoint's pending tasks go to one child process
(``python -m mamba_eval.commands.batch --worker``) that parses the lm-eval flags with lm-eval's own
``run`` parser, loads the model once, and runs ``lm_eval.simple_evaluate`` task by task, saving
each result with lm-eval's own ``EvaluationTracker`` as soon as it is complete (into a staging
folder, then renamed to ``<task>.json``). A checkpoint that fails (no config, bad weights, a task
that errors) does not stop the others; failures are reported at the end with their one-line
error and the exit status is 1. The child dies with its parent (``PR_SET_PDEATHSIG`` on Linux,
plus a parent watchdog), so killing ``mamba-eval batch`` leaves no evaluation running.

Executors:

- ``local`` (default): this machine. One checkpoint per GPU (``CUDA_VISIBLE_DEVICES`` set per
  worker; GPUs found with ``torch.cuda.device_count()`` in a child process), or with
  ``--gpus-per-checkpoint K`` one checkpoint per K GPUs, data parallel through
  ``accelerate launch``. Without GPUs, ``--workers N`` CPU workers (default 1).
- ``slurm``: a SLURM job array through submitit, one array task per checkpoint
  (``--slurm-*`` options: partition, time, array parallelism, ...). Results land in the same
  folder layout, so resuming and ``mamba-eval table`` work identically.
- ``submitit-local``: the same submitit code path with submitit's ``LocalExecutor`` (one
  local process per checkpoint, all at once): for trying the cluster path on one machine.

Progress: a line per finished or failed unit on stderr (counts, elapsed time), and
``OUTPUT/batch.json`` rewritten at every change.

Library use::

    from mamba_eval.commands.batch import expand_checkpoints, run_batch
    result = run_batch(expand_checkpoints(["ckpts/*/"]), ["hellaswag", "piqa"], "runs/b1",
                       lm_eval_args=["--batch_size", "64"])
    assert result.ok

Modules, by job:

- ``plan``: checkpoints (paths, globs, hub ids, manifests), slugs, labels, the lm-eval flags
  and the settings that change results, ``CheckpointJob`` and the per-task fingerprints.
- ``store``: the output layout, unit states, the per-checkpoint lock, result files put in place
  atomically, the status file and progress lines.
- ``worker``: the evaluation process of one checkpoint (lm-eval's ``simple_evaluate`` and
  ``EvaluationTracker``), and the guard that makes it die with its parent.
- ``executors``: ``run_checkpoint`` (one checkpoint's evaluation process), local GPU/CPU slots,
  submitit job arrays.
- ``cli``: ``add_subcommand`` (the ``mamba-eval batch`` arguments), ``run_batch`` and the report.

``python -m mamba_eval.commands.batch`` (``__main__``) is the worker (``--worker SPEC``), the
launcher guard (``--exec ARGV...``) or else ``mamba-eval batch`` itself. Every module imports only
the standard library at the top: the CLI must start fast.
"""

from mamba_eval.commands.batch.cli import BatchResult, add_subcommand, run_batch
from mamba_eval.commands.batch.executors import SlurmOptions, detect_gpus, make_executor, run_checkpoint
from mamba_eval.commands.batch.plan import (
    Checkpoint, CheckpointJob, expand_checkpoints, parse_model_args, plan_jobs, read_manifest,
)
from mamba_eval.commands.batch.store import CHECKPOINT_FILE, RESULT_KEY, STATUS_FILE, unit_state

__all__ = [
    "Checkpoint",
    "CheckpointJob",
    "BatchResult",
    "SlurmOptions",
    "expand_checkpoints",
    "read_manifest",
    "parse_model_args",
    "detect_gpus",
    "plan_jobs",
    "unit_state",
    "run_checkpoint",
    "run_batch",
    "make_executor",
    "add_subcommand",
    "CHECKPOINT_FILE",
    "RESULT_KEY",
    "STATUS_FILE",
]
