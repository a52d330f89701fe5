"""Start-up hook that registers ``mamba`` as an lm-eval model, and the package's long-context probe
tasks as lm-eval tasks, without any user import. By default it does nothing else but silence
lm-eval's warnings about the package's own offline task configs.

lm-eval 0.4.13 discovers models only through its registry (``lm_eval.api.registry``); it
scans no entry points. The wheel therefore installs ``mamba_eval_hook.pth`` into
site-packages. Its one ``import`` line, run by ``site`` at every interpreter start-up, puts a
stub finder (``MambaEvalStartupHook``, defined in the ``.pth`` itself so that start-up imports
no file) at the front of ``sys.meta_path``. The stub answers ``None`` after three string
comparisons, and on the first import of a watched module it removes itself and calls
:func:`install_and_find_spec` here. Processes that never import lm-eval never import this
module. From then on the finder below watches three modules:

``lm_eval.models``
    lm-eval's built-in model table. When it has finished executing, ``mamba`` is added to
    the registry as the lazy placeholder ``"mamba_eval.harness.lm:MambaLM"`` (nothing heavy is
    imported until lm-eval asks for the class).

``lm_eval.api.registry``
    ``get_model`` imports the built-ins only while the registry is *empty*, so an entry
    added before ``lm_eval.models`` runs would hide ``hf``, ``dummy`` and the rest. To make
    every import order safe, as soon as the registry module has executed (and before
    anyone else can register into it) ``lm_eval.models`` is imported, which is cheap: it
    only stores placeholder strings. The registry is thus never non-empty without the
    built-ins, and ``mamba`` is added right after them.

``lm_eval.tasks.manager``
    lm-eval's ``TaskManager``. Its ``__init__`` is wrapped so that, whenever it indexes the
    built-in tasks (``include_defaults=True``, the default), it also indexes the package's
    probe tasks (``tasks/probes``: ``mamba_passkey``, ``mamba_mqar``, ...) *before* any
    ``include_path`` of the caller, so the caller's configs of the same name still win. Thus
    ``lm_eval --model mamba --tasks mamba_passkey_16k`` works without ``--include_path``. The
    instance's ``include_path`` attribute keeps the caller's value. lm-eval's warnings that the
    offline mirrors of the stock tasks override them (one per task, every run) are silenced
    (:class:`_OwnOverrides`); every other warning stays.

Opt-in: with ``MAMBA_EVAL_HARNESS_CACHE=1`` (:data:`HARNESS_CACHE_ENV`) lm-eval's task index
and its compiled prompt templates are also cached once the task manager is imported
(:mod:`mamba_eval.harness.task_cache`: exact, but they replace parts of lm-eval's own code).
``mamba-eval`` sets the variable for its commands and their workers unless it is set already
(``0`` keeps them off there too); a plain ``lm_eval`` run leaves lm-eval's code untouched.

After both are done the finder removes itself. The real loader is restored on
the module objects, so the hook leaves no trace in ``__loader__`` or ``__spec__``.

Every failure inside the hook is swallowed: it must never break an interpreter. Set
``MAMBA_EVAL_HOOK_DEBUG=1`` to print those failures to stderr, or
``MAMBA_EVAL_DISABLE_HOOK=1`` to switch the hook off. This module imports nothing beyond
``sys`` and ``os`` until lm-eval's task manager has been imported.
"""

import logging
import os
import sys

MODEL_NAME = "mamba"
MODEL_TARGET = "mamba_eval.harness.lm:MambaLM"

_REGISTRY_MODULE = "lm_eval.api.registry"
_MODELS_MODULE = "lm_eval.models"
_TASKS_MODULE = "lm_eval.tasks.manager"
_WRAPPED_MARK = "_mamba_eval_probe_tasks"
_INDEX_LOGGER = "lm_eval.tasks._index"

#: Opt-in switch for the task-index and template caches (``1``/``true``/``yes``/``on``).
HARNESS_CACHE_ENV = "MAMBA_EVAL_HARNESS_CACHE"


def harness_caches_wanted() -> bool:
    """Whether ``$MAMBA_EVAL_HARNESS_CACHE`` opts in to :func:`install_harness_caches`."""
    return os.environ.get(HARNESS_CACHE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _report(exc):
    """Print a swallowed failure when ``MAMBA_EVAL_HOOK_DEBUG`` is set; stay silent otherwise."""
    if os.environ.get("MAMBA_EVAL_HOOK_DEBUG"):
        import traceback

        sys.stderr.write("mamba_eval.harness.registration: ignored error:\n")
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)


def register():
    """Add ``mamba`` to lm-eval's model registry as a lazy placeholder.

    An existing ``mamba`` entry (for example the concrete class, once ``mamba_eval.harness.lm`` has
    been imported and registered itself) is left alone. Called only once ``lm_eval.models``
    has run, so the built-in models are already in the registry.
    """
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=MODEL_TARGET)


def _on_models_loaded():
    try:
        register()
    except Exception as exc:  # a frozen registry, an incompatible lm-eval, ...
        _report(exc)
    finally:
        _done(_MODELS_MODULE)


def probe_tasks_dir():
    """The installed ``tasks/probes`` folder (found without importing anything heavy), or None."""
    import importlib.util

    spec = importlib.util.find_spec("mamba_eval.tasks")
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        folder = os.path.join(root, "probes")
        if os.path.isdir(folder):
            return folder
    return None


def wrap_task_manager(cls):
    """Make ``cls`` (lm-eval's ``TaskManager``) index the probe tasks with the built-in ones.

    A no-op when already wrapped, or when ``__init__`` lacks ``include_path`` or
    ``include_defaults`` (an lm-eval this hook does not know)."""
    import functools
    import inspect

    init = cls.__init__
    if getattr(init, _WRAPPED_MARK, False):
        return
    signature = inspect.signature(init)
    if not {"include_path", "include_defaults"} <= set(signature.parameters):
        return

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        user_path, call_args, call_kwargs, widened = None, (self, *args), kwargs, False
        try:
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            folder = probe_tasks_dir()
            if bound.arguments["include_defaults"] and folder is not None:
                user_path = bound.arguments["include_path"]
                given = [] if user_path is None else list(user_path) if isinstance(user_path, (list, tuple)) else [user_path]
                if not any(os.path.realpath(str(p)) == os.path.realpath(folder) for p in given):
                    bound.arguments["include_path"] = [folder, *given]
                    call_args, call_kwargs, widened = bound.args, bound.kwargs, True
        except Exception as exc:  # the caller's own arguments are wrong: let lm-eval say so
            _report(exc)
        init(*call_args, **call_kwargs)
        if widened and hasattr(self, "include_path"):
            self.include_path = user_path

    setattr(__init__, _WRAPPED_MARK, True)
    cls.__init__ = __init__


def install_harness_caches():
    """lm-eval's task index and compiled prompt templates cached (:mod:`mamba_eval.harness.task_cache`),
    once ``lm_eval.tasks.manager`` has been imported (and with it the modules they live in)."""
    from mamba_eval.harness import task_cache

    modules = sys.modules
    if "lm_eval.tasks._index" in modules and "lm_eval.tasks._yaml_loader" in modules:
        task_cache.install_index_cache(modules["lm_eval.tasks._index"], modules["lm_eval.tasks._yaml_loader"])
    env = getattr(modules.get("lm_eval.utils"), "env", None)
    if env is not None and callable(getattr(env, "from_string", None)):
        task_cache.install_template_cache(env)


class _OwnOverrides(logging.Filter):
    """Drops lm-eval's warning that an offline mirror of ours overrides its own stock task.
    ``mamba_eval.harness.offline`` decides, imported only when an override warning is logged, so a
    run that logs none imports nothing more of mamba-eval."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "overrides existing task" not in str(record.msg):
            return True
        from mamba_eval.harness.offline import is_own_override

        return not is_own_override(record)


def _on_tasks_loaded():
    try:
        wrap_task_manager(sys.modules[_TASKS_MODULE].TaskManager)
    except Exception as exc:
        _report(exc)
    try:
        index_log = logging.getLogger(_INDEX_LOGGER)
        if not any(isinstance(f, _OwnOverrides) for f in index_log.filters):
            index_log.addFilter(_OwnOverrides())
    except Exception as exc:
        _report(exc)
    try:
        if harness_caches_wanted():
            install_harness_caches()
    except Exception as exc:
        _report(exc)
    finally:
        _done(_TASKS_MODULE)


def _on_registry_loaded():
    # If lm_eval.models is in sys.modules it is the importer of the registry (it is still
    # executing) or it is already done; either way its own completion registers mamba.
    if _MODELS_MODULE in sys.modules:
        return
    try:
        __import__(_MODELS_MODULE)  # fires _on_models_loaded through the finder
    except Exception as exc:
        _report(exc)


_CALLBACKS = {
    _REGISTRY_MODULE: _on_registry_loaded,
    _MODELS_MODULE: _on_models_loaded,
    _TASKS_MODULE: _on_tasks_loaded,
}
# The watched modules whose work is still to do; the finder leaves when none is.
_pending = {_MODELS_MODULE, _TASKS_MODULE}


def _done(module):
    _pending.discard(module)
    if not _pending:
        uninstall()


class _PostImportLoader:
    """Wraps a module's real loader and runs a callback after the module has executed."""

    def __init__(self, loader, callback):
        self._loader = loader
        self._callback = callback

    def create_module(self, spec):
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module):
        try:
            self._loader.exec_module(module)
        finally:
            module.__loader__ = self._loader
            spec = getattr(module, "__spec__", None)
            if spec is not None and spec.loader is self:
                spec.loader = self._loader
        try:
            self._callback()
        except Exception as exc:
            _report(exc)

    def __getattr__(self, name):
        # Everything else (get_source, get_resource_reader, is_package, ...) is the real loader's.
        return getattr(self._loader, name)


class _Finder:
    """Meta-path finder that only wraps the loaders of the watched lm-eval modules."""

    def __init__(self):
        # Names being searched right now: a finder asked below may come back here (for
        # example a second copy of the start-up stub); answer it with None.
        # The import system holds the module's lock during find_spec, so no two threads
        # search the same name at once.
        self._searching = set()

    def find_spec(self, fullname, path=None, target=None):
        callback = _CALLBACKS.get(fullname)
        if callback is None or fullname in self._searching:
            return None
        self._searching.add(fullname)
        try:
            for finder in sys.meta_path:
                if finder is self:
                    continue
                find_spec = getattr(finder, "find_spec", None)
                if find_spec is None:
                    continue
                spec = find_spec(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
            if spec.loader is None or not hasattr(spec.loader, "exec_module"):
                return spec
            spec.loader = _PostImportLoader(spec.loader, callback)
            return spec
        except Exception as exc:
            _report(exc)
            return None
        finally:
            self._searching.discard(fullname)


_finder = _Finder()


def uninstall():
    """Remove the finder from ``sys.meta_path`` (a no-op when it is not there)."""
    try:
        sys.meta_path.remove(_finder)
    except ValueError:
        pass


def install_and_find_spec(fullname, path=None, target=None):
    """Install the hook and find ``fullname`` through it (called once by the ``.pth`` stub)."""
    install()
    if _finder in sys.meta_path:
        return _finder.find_spec(fullname, path, target)
    return None


def install():
    """Arrange for ``mamba`` to be registered with lm-eval; safe to call more than once.

    When lm-eval is already imported (a late call, say in an interpreter started with
    ``-S``), registration happens at once instead of through the finder.
    """
    try:
        if os.environ.get("MAMBA_EVAL_DISABLE_HOOK"):
            return
        # Modules already imported (a late call) are handled at once; a module still executing
        # (in sys.modules without its class yet) cannot be, and is left alone.
        if _MODELS_MODULE in sys.modules:
            _on_models_loaded()
        tasks = sys.modules.get(_TASKS_MODULE)
        if tasks is not None:
            if hasattr(tasks, "TaskManager"):
                _on_tasks_loaded()
            else:
                _done(_TASKS_MODULE)
        if not _pending:
            return
        if _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)
        if _REGISTRY_MODULE in sys.modules:
            _on_registry_loaded()
    except Exception as exc:
        _report(exc)
