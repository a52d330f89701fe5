"""mamba-eval: Mamba and Mamba-2 language models for lm-evaluation-harness.

This module is imported by a ``.pth`` hook at every Python start-up (see ``_hook.py``), so
it must stay cheap: no torch, no lm_eval, nothing heavier than the standard library.
"""

__version__ = "0.1.0"
