"""Test setup: Triton kernels run in Triton's interpreter where there is no GPU; tests
marked ``gpu`` skip without one, tests marked ``slow`` run only with ``-m slow``."""
import os

import pytest
import torch

# Triton kernels run in the interpreter on machines without a GPU (set before triton loads).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
