"""lm-eval task configurations shipped with mamba-eval (installed as ``mamba_eval.tasks``).

``offline/`` describes the local data folder that replaces the Hugging Face Hub for the
standard tasks; :mod:`mamba_eval.harness.offline` turns it into task configs. See ``README.md``.
"""
