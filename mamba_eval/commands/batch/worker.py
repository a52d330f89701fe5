"""The evaluation process of one checkpoint: ``python -m mamba_eval.commands.batch --worker SPEC``.

It reads the job that ``run_checkpoint`` wrote to ``SPEC``, turns the lm-eval flags into lm-eval's
own ``EvaluatorConfig`` (the same parser and config ``lm-eval run`` uses), loads the model once
through lm-eval's model registry, and then, task by task, runs ``lm_eval.simple_evaluate`` on the
loaded model and saves the result with lm-eval's ``EvaluationTracker`` (``save_results_aggregated``
and, with ``--log_samples``, ``save_results_samples``). The tracker writes into a private staging
folder under its own timestamped names; the files are then moved into the documented layout
(``<task>.json``, ``<task>[.<subtask>].samples.jsonl``) by rename, result file last, so a unit is
complete or absent whenever the process dies. A task that fails writes ``<task>.error`` and the
next task runs; a model that does not load fails every task alike.

The process dies with its parent (``PR_SET_PDEATHSIG`` on Linux, plus a watchdog thread), so
killing ``mamba-eval batch`` leaves no evaluation running. ``--exec ARGV...`` arms the same
guard and then becomes ``ARGV`` (``accelerate launch`` for data-parallel workers).

Top-level imports are the standard library only; lm-eval and torch are imported in the process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from mamba_eval.commands.batch.plan import lm_eval_run_parser
from mamba_eval.commands.batch.store import RESULT_KEY, publish, result_path, staging_dir, write_errors
from mamba_eval.errors import MambaEvalError, check_tasks_known, one_line
from mamba_eval.utils import read_json

#: Set by the parent to its pid: the worker watches that it is still its parent.
PARENT_ENV = "MAMBA_EVAL_BATCH_PARENT"


# ----------------------------------------------------------------------- dying with the parent


def die_with_parent() -> None:
    """End this process when its parent dies (Linux: PR_SET_PDEATHSIG; elsewhere: a watchdog)."""
    expected = int(os.environ.get(PARENT_ENV, "0") or 0)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if expected and os.getppid() != expected:
        os._exit(70)  # the parent died before the death signal was armed

    def watch():
        while True:
            time.sleep(2.0)
            if expected and os.getppid() != expected:
                os._exit(70)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def exec_with_parent(argv: list[str]) -> int:
    """Arm the parent-death signal, then become ``argv`` (e.g. ``accelerate launch``)."""
    die_with_parent()
    os.environ[PARENT_ENV] = str(os.getpid())  # the launched ranks watch the launcher
    os.execv(argv[0], argv)
    return 127  # not reached


# ----------------------------------------------------------------------------- evaluation


def _lm_eval_config(spec: dict, tasks: list[str], folder: Path):
    """lm-eval's ``EvaluatorConfig`` for this job, built as ``lm-eval run`` builds it."""
    from lm_eval.config.evaluate_config import EvaluatorConfig

    argv = [*spec["lm_eval_args"], "--model", spec["model"], "--model_args", json.dumps(spec["model_args"]),
            "--tasks", ",".join(tasks), "--output_path", str(folder)]
    if spec.get("include_path"):
        argv += ["--include_path", spec["include_path"]]
    return EvaluatorConfig.from_cli(lm_eval_run_parser().parse_args(argv))


def _load_model(cfg):
    """The model, built once for all the checkpoint's tasks, by the registry call that
    ``simple_evaluate`` makes for a model given by name."""
    import lm_eval.api.registry

    return lm_eval.api.registry.get_model(cfg.model).create_from_arg_obj(
        cfg.model_args, {"batch_size": cfg.batch_size, "max_batch_size": cfg.max_batch_size, "device": cfg.device})


def evaluate_task(lm, cfg, task: str, task_manager, folder: Path, record: dict) -> bool:
    """Run ``task`` on the loaded model ``lm`` with lm-eval's ``simple_evaluate`` and save it
    with lm-eval's ``EvaluationTracker`` into ``folder`` (``<task>.json``, with ``record`` under
    ``RESULT_KEY``; samples as ``<task>[.<name>].samples.jsonl``). Returns False on the ranks of a
    data-parallel run that hold no results (lm-eval returns them on the main process only)."""
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker

    staging = staging_dir(folder, task)
    try:
        # A ".json" output path makes the tracker write "<stem>_<date>.json" next to it, and
        # the samples files in the same folder.
        tracker = EvaluationTracker(output_path=str(staging / f"{task}.json"))
        seed = cfg.seed
        results = simple_evaluate(
            model=lm, model_args=cfg.model_args, tasks=[task], num_fewshot=cfg.num_fewshot,
            batch_size=cfg.batch_size, max_batch_size=cfg.max_batch_size, device=cfg.device,
            use_cache=cfg.use_cache, cache_requests=cfg.cache_requests.get("cache_requests", False),
            rewrite_requests_cache=cfg.cache_requests.get("rewrite_requests_cache", False),
            delete_requests_cache=cfg.cache_requests.get("delete_requests_cache", False),
            limit=cfg.limit, samples=cfg.samples, check_integrity=cfg.check_integrity, write_out=cfg.write_out,
            log_samples=cfg.log_samples, evaluation_tracker=tracker, system_instruction=cfg.system_instruction,
            apply_chat_template=cfg.apply_chat_template, fewshot_as_multiturn=cfg.fewshot_as_multiturn,
            gen_kwargs=cfg.gen_kwargs, task_manager=task_manager, verbosity=cfg.verbosity,
            predict_only=cfg.predict_only,
            random_seed=seed[0] if seed else None, numpy_random_seed=seed[1] if seed else None,
            torch_random_seed=seed[2] if seed else None, fewshot_random_seed=seed[3] if seed else None,
            confirm_run_unsafe_code=cfg.confirm_run_unsafe_code, metadata=cfg.metadata,
        )
        if results is None:
            return False
        samples = results.pop("samples", None)  # never inside the results file, as with `lm-eval run`
        if not cfg.log_samples:
            samples = None
        # simple_evaluate names a model given as an object by its class ("CUSTOM" source); the
        # file names the lm-eval model that ran, as `lm-eval run --model NAME` writes it.
        results["config"]["model"] = cfg.model
        # Its device is the --device flag (cuda:0 when not given), not the one the model took.
        results["config"]["device"] = str(getattr(lm, "device", cfg.device))
        tracker.general_config_tracker.model_source = cfg.model
        results[RESULT_KEY] = record
        tracker.save_results_aggregated(results=results, samples=samples)
        written = sorted(staging.glob("*.json"))
        if len(written) != 1:  # the tracker logs a failed write as a warning and goes on
            raise RuntimeError(f"lm-eval's EvaluationTracker did not write the results of {task} "
                               "(see its warning above)")
        moves = []
        for name in sorted(samples or {}):
            tracker.save_results_samples(task_name=name, samples=samples[name])
            lines = staging / f"samples_{name}_{tracker.date_id}.jsonl"
            if not lines.is_file():
                raise RuntimeError(f"lm-eval's EvaluationTracker did not write the samples of {name} "
                                   "(see its warning above)")
            moves.append((lines, folder / (f"{task}.samples.jsonl" if name == task
                                           else f"{task}.{name}.samples.jsonl")))
        for source, target in moves:
            publish(source, target)
        publish(written[0], result_path(folder, task))  # last: its presence marks the unit done
        return True
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def run_worker(spec_path: str) -> int:
    """Evaluate the tasks of one checkpoint as described by the spec file (see ``run_checkpoint``).

    Exit status: 0 all tasks written, 3 nothing ran (bad settings or a model that does not load),
    4 some task failed; each failure is in its ``<task>.error``."""
    import traceback

    die_with_parent()
    spec = read_json(spec_path)
    if not isinstance(spec, dict):
        raise MambaEvalError(f"{spec_path}: not a worker spec (unreadable or not a JSON object)")
    folder = Path(spec["folder"])
    rank = int(os.environ.get("RANK", "0") or 0)
    tasks = list(spec["tasks"])

    def fail(tasks_, exc):
        traceback.print_exc()
        if rank == 0:
            write_errors(folder, tasks_, one_line(exc))

    try:
        cfg = _lm_eval_config(spec, tasks, folder)
        lm = _load_model(cfg)
        from lm_eval.tasks import TaskManager

        task_manager = TaskManager(include_path=cfg.include_path, metadata=cfg.metadata or {})
    except BaseException as exc:  # noqa: BLE001 - the model or the settings: every task fails alike
        fail(tasks, exc)
        return 3

    failures = 0
    for task in tasks:
        print(f"===== {task}", flush=True)
        record = {"format": 1, "task": task, "fingerprint": spec["fingerprints"][task],
                  "settings": spec["settings"], "slug": spec["slug"], "name": spec["name"]}
        try:
            check_tasks_known(task_manager, [task])
            evaluate_task(lm, cfg, task, task_manager, folder, record)
        except Exception as exc:  # noqa: BLE001 - one task failing must not stop the next
            failures += 1
            fail([task], exc)
    return 4 if failures else 0
