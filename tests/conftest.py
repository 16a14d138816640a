"""Test setup: Triton kernels run under the CPU interpreter when no GPU is present."""

import os

import torch

# Must happen before triton is first imported (importing torch does not import triton).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
