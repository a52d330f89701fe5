"""mamba-eval: Mamba-family language models for lm-evaluation-harness.

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
