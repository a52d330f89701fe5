"""The ``mamba-eval`` command.

``mamba-eval run [--data-dir DIR] <lm-eval run flags>``
    lm-eval's own ``run`` (``lm_eval.__main__.cli_evaluate``) with every flag passed
    through untouched. mamba-eval's options are consumed first:

    ``--data-dir DIR`` (default: ``$MAMBA_EVAL_DATA_DIR``)
        a local data folder; the task configs that read it instead of the Hugging Face Hub
        are built by ``mamba_eval.harness.offline.prepare_offline_tasks`` and handed to lm-eval as
        ``--include_path``.

    ``--model`` defaults to ``mamba`` (lm-eval's own default is ``hf``) unless a
    ``--config`` file is given, which then decides. With ``mamba`` and no ``--config``, the
    ``--device`` lm-eval gets (and records in the results, ``cuda:0`` when none is given) is the
    device the model uses: model_args' ``device``, else ``--device`` or the default device as the
    model resolves it (the CPU when CUDA is absent).

    An unknown task name, and task data that ``datasets`` cannot fetch from the Hub, end the
    run with one line (batch's check of the names; the data error says how to give a data
    folder); offline without a data folder, the data is checked before the model loads.

``mamba-eval demo [-o DIR]``
    builds the offline demo (``mamba_eval.commands.demo``) and evaluates it with lm-eval.

``mamba-eval --version`` prints the versions of mamba-eval and lm-eval.

Every command runs with lm-eval's task-index and template caches switched on
(``MAMBA_EVAL_HARNESS_CACHE=1``, see :mod:`mamba_eval.harness.registration`; the variable
reaches worker processes too) unless the variable is set already: ``0`` keeps them off. A
``MambaEvalError`` ends a command with one line, ``mamba-eval: error: <message>``, and exit
status 1 (:mod:`mamba_eval.errors`).

A subcommand is one ``_add_<name>(subparsers)`` function that adds its parser and sets
``handler=(args, extra) -> int``; list it in ``_SUBCOMMANDS``. A subcommand that lives in a
module of its own (``batch``, ``table``, ``probe``) is listed in ``_MODULE_SUBCOMMANDS``; the
module's ``add_subcommand(subparsers)`` does the same and its top level imports only the
standard library. A subcommand that forwards
unknown flags to another tool also sets ``passthrough=True``; any other rejects them.
Importing this module is cheap: lm-eval, torch and the rest load only when a command runs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import textwrap

from mamba_eval import __version__
from mamba_eval.errors import MambaEvalError, check_tasks_known, error_line, traceback_wanted
from mamba_eval.harness.registration import HARNESS_CACHE_ENV
from mamba_eval.utils import DATA_DIR_ENV, data_dir_from_env

PROG = "mamba-eval"
DEFAULT_MODEL = "mamba"


class _Parser(argparse.ArgumentParser):
    """Argument parser whose usage errors are one line (``prog: error: ...``) and exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        lm_eval_version = version("lm_eval")
    except PackageNotFoundError:
        lm_eval_version = "not installed"
    return f"{PROG} {__version__} (lm-eval {lm_eval_version})"


# ---------------------------------------------------------------------------------- run


_RUN_DESCRIPTION = textwrap.dedent(f"""\
    Run lm-eval's evaluation ('lm-eval run'). Every flag other than the ones below is
    passed to lm-eval unchanged; lm-eval's own help follows.

    --model defaults to '{DEFAULT_MODEL}' (lm-eval's default is 'hf') unless --config is given.
    With '{DEFAULT_MODEL}', --device defaults to the device the model uses (the results record it).
    """)


def _add_run(subparsers) -> None:
    parser = subparsers.add_parser(
        "run",
        help="evaluate with lm-eval (takes lm-eval's 'run' flags)",
        description=_RUN_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,  # -h/--help go to lm-eval, after this parser's own options
        allow_abbrev=False,  # never mistake an lm-eval flag for an abbreviation of ours
        usage=f"{PROG} run [--data-dir DIR] <lm-eval run flags>",
    )
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        default=None,
        help=f"local data folder: tasks read it instead of the Hugging Face Hub "
        f"(default: ${DATA_DIR_ENV}; an empty value turns it off)",
    )
    # lm-eval's flags that mamba-eval needs to see; they are passed on as given.
    parser.add_argument("--model", "-M", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--config", "-C", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--include_path", default=None, help=argparse.SUPPRESS)
    parser.set_defaults(handler=_run, passthrough=True, run_parser=parser)


def _run(args: argparse.Namespace, extra: list[str]) -> int:
    parser = args.run_parser
    wants_help = any(a in ("-h", "--help") for a in extra)
    given = [a for a in (args.model, args.config, args.include_path, args.data_dir) if a is not None]
    if wants_help or not (extra or given):
        parser.print_help()
        print()
        return _call_lm_eval(["--help"])

    from mamba_eval.harness.offline import check_hub_data

    forwarded = list(extra)
    if args.config is not None:
        forwarded += ["--config", args.config]
    model = args.model if args.model is not None else (None if args.config else DEFAULT_MODEL)
    if model is not None:
        forwarded += ["--model", model]
    # With --config the tasks and the device come from its file, which lm-eval reads.
    flags = None if args.config else _lm_eval_flags(forwarded)
    if model == DEFAULT_MODEL and flags is not None:
        forwarded += _device_args(flags)
    include_path, data_dir = _include_path(args)
    if include_path is not None:
        forwarded += ["--include_path", include_path]
    tasks = _task_names(flags)
    if include_path is None:
        check_hub_data(tasks)
    return _evaluate(forwarded, tasks, include_path, data_dir)


def _evaluate(run_args: list[str], tasks: list[str], include_path: str | None, data_dir: str | None) -> int:
    """:func:`_call_lm_eval`, with lm-eval's tracebacks for unknown ``tasks`` and for task data
    it cannot fetch turned into one-line errors."""
    from mamba_eval.harness.offline import from_datasets, hub_data_error

    try:
        return _call_lm_eval(run_args)
    except ConnectionError as exc:
        if from_datasets(exc):
            raise hub_data_error(exc, data_dir) from None
        raise
    except ValueError as exc:
        if tasks and not isinstance(exc, MambaEvalError):
            _check_tasks(tasks, include_path)
        raise


def _include_path(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(lm-eval's include path, the data folder it was prepared from or None): ``--include_path``
    as given, or the offline tasks of ``--data-dir`` / ``$MAMBA_EVAL_DATA_DIR``."""
    parser = args.run_parser
    data_dir = args.data_dir if args.data_dir is not None else (data_dir_from_env() or "")
    if not data_dir:
        return args.include_path, None
    if args.include_path is not None:
        if args.data_dir is not None:
            parser.error(
                "--data-dir and --include_path cannot be combined (lm-eval takes one "
                "include path); put your task configs next to the offline ones instead"
            )
        print(f"{PROG}: ignoring ${DATA_DIR_ENV}={data_dir} because --include_path is given", file=sys.stderr)
        return args.include_path, None
    from mamba_eval.harness.offline import prepare_offline_tasks

    try:
        return str(prepare_offline_tasks(data_dir)), str(data_dir)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(f"--data-dir {data_dir}: {exc}")


def _lm_eval_flags(run_args: list[str]) -> argparse.Namespace | None:
    """lm-eval's own reading of its ``run`` flags, or None when its parser rejects them (lm-eval
    then says why, as it would without mamba-eval)."""
    from mamba_eval.commands.batch.plan import lm_eval_run_parser

    try:
        return lm_eval_run_parser().parse_args(run_args)
    except MambaEvalError:
        return None


def _task_names(flags: argparse.Namespace | None) -> list[str]:
    """The task names of lm-eval's ``--tasks`` (not the YAML files or folders of them it also takes)."""
    tasks = getattr(flags, "tasks", None) or []
    return [t for t in tasks if t and not t.endswith((".yaml", ".yml")) and not os.path.isdir(t)]


def _check_tasks(names: list[str], include_path: str | None) -> None:
    """The one-line error for the names lm-eval does not know (batch's check), once lm-eval has
    refused them with a traceback; a run with known tasks pays nothing for it."""
    from lm_eval.tasks import TaskManager

    check_tasks_known(TaskManager(include_path=include_path), names)


def _device_args(flags: argparse.Namespace) -> list[str]:
    """``--device D`` for lm-eval, so that the results record the device the ``mamba`` model uses:
    lm-eval records its ``--device`` (``cuda:0`` when not typed), the model takes model_args'
    device over it and the CPU when CUDA is absent. D is model_args' device when given (with
    ``merge_run_flags``'s warning when ``--device`` differs), else the device the model makes of
    ``--device``, or its default device."""
    from mamba_eval.harness.model_args import merge_run_flags, parse_device

    model_args = flags.model_args or {}
    if "device" in model_args:
        merge_run_flags({"device": model_args["device"]}, {"device": flags.device})
        return ["--device", str(model_args["device"])]
    return ["--device", str(parse_device(flags.device))]


def _call_lm_eval(run_args: list[str]) -> int:
    """Run ``lm-eval run <run_args>`` in this process through lm-eval's own CLI entry."""
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", "run", *run_args]
    try:
        cli_evaluate()
    except SystemExit as exc:
        return _exit_code(exc)
    finally:
        sys.argv = saved
    return 0


# --------------------------------------------------------------------------------- demo


def _add_demo(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="build the offline demo (tokenizer, checkpoint, task) and evaluate it with lm-eval",
        description="Everything the demo needs is generated locally from a fixed seed (no hub "
        "access): a byte-level BPE tokenizer, a small Mamba checkpoint in mamba_ssm format, and "
        "an lm-eval task of the project's own. Then 'lm-eval run --model mamba' evaluates it.",
    )
    # '--out', the former spelling, still works: argparse takes an unambiguous prefix of '--output'.
    parser.add_argument("-o", "--output", default="runs/demo", metavar="DIR",
                        help="where to build the demo and write results (default: runs/demo)")
    parser.add_argument("--device", default="cpu", help="device for the evaluation (default: cpu)")
    parser.add_argument("--batch_size", default="8", help="lm-eval batch size (default: 8)")
    parser.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace, extra: list[str]) -> int:
    from pathlib import Path

    from mamba_eval.commands.demo import build_demo, chance_note, demo_lm_eval_args

    out = Path(args.output)
    paths = build_demo(out)
    run_args = demo_lm_eval_args(paths, device=args.device, batch_size=args.batch_size)
    run_args += ["--output_path", str(out / "results")]
    print(f"{PROG}: demo built in {out}; running: lm_eval {' '.join(run_args)}", file=sys.stderr)
    status = _call_lm_eval(run_args)
    if status == 0:
        print(f"{PROG} demo: {chance_note(paths)}")  # under lm-eval's results table, on stdout too
    return status


# --------------------------------------------------------------------------------- main


_SUBCOMMANDS = (_add_run, _add_demo)
_MODULE_SUBCOMMANDS = ("mamba_eval.commands.batch", "mamba_eval.commands.table", "mamba_eval.commands.probe")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Mamba and Mamba-2 language models in lm-evaluation-harness.",
        epilog=f"'{PROG} <command> --help' shows a command's options.",
    )
    parser.add_argument("--version", action="version", version=_versions())
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in _SUBCOMMANDS:
        add(subparsers)
    for module_name in _MODULE_SUBCOMMANDS:
        importlib.import_module(module_name).add_subcommand(subparsers)
    return parser


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mamba-eval`` console script; returns the exit status.

    The harness caches are switched on for the command's duration only, so that a caller that
    runs ``main`` in its own process (tests, scripts) keeps its environment."""
    opted = HARNESS_CACHE_ENV in os.environ
    if not opted:
        os.environ[HARNESS_CACHE_ENV] = "1"
    try:
        return _main(argv)
    finally:
        if not opted:
            os.environ.pop(HARNESS_CACHE_ENV, None)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        if extra and not getattr(args, "passthrough", False):
            parser.error(f"unrecognized arguments for '{args.command}': {' '.join(extra)}")
        return args.handler(args, extra)
    except SystemExit as exc:
        return _exit_code(exc)
    except MambaEvalError as exc:
        if traceback_wanted():
            raise
        print(error_line(exc), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
