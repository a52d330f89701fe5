"""The lm-eval integration: the ``mamba`` model class, tokenisation, scoring, generation,
registration and task configs.

Imported by the start-up hook (``registration``), so this file imports nothing.
"""
