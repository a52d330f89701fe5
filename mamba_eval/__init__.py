"""mamba-eval: Mamba-family language models for lm-evaluation-harness.

The package map (``docs/architecture.md`` has one request's path through it); each layer imports
only the layers below it:

- ``commands/``: the ``mamba-eval`` command and its subcommands (run, demo, batch, table, probe).
- ``harness/``: the lm-eval integration: ``lm.MambaLM`` (the model class), tokenisation, the
  scoring engine and its executor, generation, the start-up registration hook, task caches,
  offline and probe task data.
- ``models/``: the model core, free of lm-eval: ``config.ModelConfig`` (a list of layers, each a
  mixer and an optional MLP), checkpoint formats, ``mixers/`` (one module per mixer kind and their
  registry), ``model.LanguageModel`` and its narrow interface, ``rows.run_rows``, layer states,
  the batch-invariance policy, op backends.
- ``kernels`` (the repository's top-level ``kernels/``: Triton kernels and their references) and
  ``tasks`` (top-level ``tasks/``: lm-eval task configs) are installed inside this package by
  setup.cfg's ``package_dir``, so the wheel installs one import name; in a source checkout the
  finder below maps them to the top-level folders.
- ``utils``, ``errors``: shared helpers and one-line errors.

This module is imported by a ``.pth`` hook at every Python start-up (see
``harness/registration.py``), so it must stay cheap: no torch, no lm_eval, nothing heavier than
the standard library.
"""

import os as _os
import sys as _sys

__version__ = "0.1.0"


def _map_checkout_folders() -> None:
    """Make ``mamba_eval.kernels`` and ``mamba_eval.tasks`` importable from a source checkout.

    The wheel installs the repository's top-level ``kernels/`` and ``tasks/`` folders inside the
    package (setup.cfg ``package_dir``), so an installed ``mamba_eval`` has them as sub-folders.
    A source checkout does not: when the checkout's ``mamba_eval`` is the one imported (running
    from the repository folder, a plain clone on ``PYTHONPATH``, an editable install), a finder
    maps the two names to the checkout's folders. Nothing is imported here.
    """
    here = _os.path.dirname(_os.path.abspath(__file__))
    root = _os.path.dirname(here)
    folders = {}
    for name in ("kernels", "tasks"):
        if _os.path.isdir(_os.path.join(here, name)):
            continue  # installed: the sub-package is there
        init = _os.path.join(root, name, "__init__.py")
        if _os.path.isfile(init):
            folders[f"{__name__}.{name}"] = init
    if not folders:
        return

    class _CheckoutFolders:
        @staticmethod
        def find_spec(fullname, path=None, target=None):
            init = folders.get(fullname)
            if init is None:
                return None
            import importlib.util

            return importlib.util.spec_from_file_location(
                fullname, init, submodule_search_locations=[_os.path.dirname(init)])

    _sys.meta_path.append(_CheckoutFolders())


_map_checkout_folders()
