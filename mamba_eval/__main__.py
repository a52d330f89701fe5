"""``python -m mamba_eval ...`` is the ``mamba-eval`` command."""

import sys

from mamba_eval.commands.cli import main

sys.exit(main())
