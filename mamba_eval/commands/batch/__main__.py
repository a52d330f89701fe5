"""``python -m mamba_eval.commands.batch``: ``--worker SPEC`` is one checkpoint's evaluation
process, ``--exec ARGV...`` becomes ``ARGV`` after arming the parent-death guard (the data-parallel
launcher), anything else is ``mamba-eval batch ARGS``."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    if argv[:1] == ["--worker"] and len(argv) == 2:
        from mamba_eval.commands.batch.worker import run_worker

        return run_worker(argv[1])
    if argv[:1] == ["--exec"] and len(argv) > 1:
        from mamba_eval.commands.batch.worker import exec_with_parent

        return exec_with_parent(argv[1:])
    from mamba_eval.commands.cli import main as cli_main

    return cli_main(["batch", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
