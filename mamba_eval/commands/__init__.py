"""The ``mamba-eval`` command and its subcommands."""
