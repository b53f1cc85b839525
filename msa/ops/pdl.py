"""Programmatic dependent launch (PDL) between the kernels of one decode step.

A decode step is a chain of small kernels (scan, re-scoring, merge, attention) whose
programs are few at batch 1, so each launch, and each kernel's ramp-up, sits on the
step's critical path. On Hopper and newer, a kernel launched with PDL (Triton's
``launch_pdl``) may start once every program of the kernel before it has called
``griddepcontrol.launch_dependents`` (``release_next``); it must wait
(``griddepcontrol.wait``, ``wait_previous``: the kernel before it finished, its writes
visible) before it reads or writes anything. Here a kernel launched that way waits
first and reads nothing before: a kernel before it that is not ours may release it
early as well. Only kernels that follow one of the step's own kernels are launched
with PDL; the step's first kernel (the scan) only releases.

Off unless ``MSA_PDL=1`` is in the environment: the kernels compile with it for sm_90
(tests/ops/test_pdl.py), but it has not yet run or been timed on a GPU.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@functools.lru_cache(maxsize=None)
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def enabled(x: torch.Tensor) -> bool:
    """Whether kernels over ``x`` use PDL: ``MSA_PDL=1`` and a CUDA tensor on sm_90 or
    newer (so not in Triton's interpreter)."""
    return os.environ.get("MSA_PDL") == "1" and x.is_cuda and _capable(
        x.device.index if x.device.index is not None else torch.cuda.current_device())


def launch(on: bool) -> dict:
    """The launch option of a kernel that waits for the one before it."""
    return {"launch_pdl": True} if on else {}


@triton.jit
def wait_previous(PDL: tl.constexpr):
    """With ``PDL``: let the next kernel launch, then wait until the kernel before this
    one has finished (a no-op in a kernel launched without PDL)."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()


@triton.jit
def release_next(PDL: tl.constexpr):
    """With ``PDL``: let the next kernel launch (it waits for this one to finish)."""
    if PDL:
        gdc_launch_dependents()
