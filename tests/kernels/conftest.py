"""Kernel tests run on the CPU through Triton's interpreter when no GPU is present.

``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates a kernel, i.e. when a kernel module is
first imported, so it is set here, before any test module of this folder imports one.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
