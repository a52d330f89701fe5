"""Build script. All metadata lives in setup.cfg; this file only ships the start-up hook.

lm-eval 0.4.13 finds models only through its registry, so the wheel installs
``mamba_eval_hook.pth`` at the top of site-packages: its one ``import`` line puts a tiny finder on
``sys.meta_path`` at every interpreter start-up, which imports ``mamba_eval.harness.registration``
only when lm-eval's registry or task manager is first imported; that registers ``mamba`` and the
probe tasks (see ``mamba_eval/harness/registration.py``).

setuptools has no option for a file at the top of site-packages, hence two commands:

* ``build_py`` copies the ``.pth`` into the root of ``build_lib``; regular wheels (and so
  ``pip install .``) install that tree into site-packages and list the file in RECORD, so
  ``pip uninstall`` removes it.
* ``editable_wheel`` (PEP 660, ``pip install -e .``) does not install ``build_lib``; it
  packs a temporary "unpacked wheel" folder instead, so the ``.pth`` is written there.
  That step uses a private method of setuptools (stable from 64 to at least 84); the
  built wheel is checked afterwards, so a change in setuptools fails the build loudly
  instead of silently producing an install without the hook.

The ``.pth`` name sorts after setuptools' ``__editable__.mamba_eval-*.pth`` (``m`` > ``_``):
``site`` processes ``.pth`` files in sorted order, and in an editable install
``mamba_eval`` is importable only once that file has installed its finder.
"""

import os
import zipfile

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH_NAME = "mamba_eval_hook.pth"
PTH_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mamba_eval", PTH_NAME)


class BuildPyWithPth(build_py):
    """``build_py`` that also puts the start-up ``.pth`` at the root of ``build_lib``."""

    def _pth_target(self):
        return os.path.join(self.build_lib, PTH_NAME)

    def run(self):
        super().run()
        # In editable mode build_lib is a scratch folder that is never installed.
        if not getattr(self, "editable_mode", False):
            self.copy_file(PTH_SOURCE, self._pth_target(), preserve_mode=False)

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        if not getattr(self, "editable_mode", False):
            outputs.append(self._pth_target())
        return outputs


class EditableWheelWithPth(editable_wheel):
    """PEP 660 editable wheel that also carries the start-up ``.pth``."""

    def _run_build_commands(self, dist_name, unpacked_wheel, *args, **kwargs):
        result = super()._run_build_commands(dist_name, unpacked_wheel, *args, **kwargs)
        # Everything in the unpacked folder is written into the wheel (and its RECORD).
        self.copy_file(PTH_SOURCE, os.path.join(unpacked_wheel, PTH_NAME), preserve_mode=False)
        return result

    def _create_wheel_file(self, bdist_wheel):
        wheel_path = super()._create_wheel_file(bdist_wheel)
        with zipfile.ZipFile(wheel_path) as wheel:
            if PTH_NAME not in wheel.namelist():
                raise RuntimeError(
                    f"the editable wheel {wheel_path} lacks {PTH_NAME}: this setuptools "
                    "version builds editable wheels differently; update setup.py"
                )
        return wheel_path


setup(cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth})
