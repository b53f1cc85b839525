"""Launch a Triton kernel with the first configuration that fits the GPU.

The default launch configurations are tuned on an H100 (227 KB of shared memory per
block). An A100 allows 163 KB and the sm_86 / sm_89 cards (A10, A40, RTX 30xx / 40xx,
L4, L40) 99 KB; Triton only finds out at the first launch, by raising ``OutOfResources``
before the kernel runs (nothing is written). ``launch_fitting`` then tries the next,
smaller configuration (fewer pipeline stages, fewer query rows per tile), remembers the
one that fits per (kernel, device, fixed arguments), and when none fits raises an error
that says how much shared memory the smallest one needs and what to do instead.
"""
from __future__ import annotations

import functools
from typing import Dict, List, Sequence

import torch
from triton.runtime.errors import OutOfResources

# (kernel name, device, fixed arguments, configurations) -> index of the first that fits
_CHOICE: Dict[tuple, int] = {}


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple:
    return tuple(torch.cuda.get_device_capability(index))


def on_hopper(x) -> bool:
    """Whether ``x`` (a tensor or a device) is on a Hopper GPU (sm_90), where the Gluon
    kernels run; the capability is read once per device (a decode step asks on every
    call)."""
    device = x.device if isinstance(x, torch.Tensor) else torch.device(x)
    return device.type == "cuda" and _capability(
        device.index if device.index is not None else torch.cuda.current_device()) == (9, 0)


def _key(kernel, args, configs, fixed) -> tuple:
    dev = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
    name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None),
                                                        "__name__", repr(kernel))
    return (name, str(dev), tuple(sorted(fixed.items())),
            tuple(tuple(sorted(c.items())) for c in configs))


def smaller_tiles(tile: str, n: int, g_pad: int, num_stages: int,
                  min_rows: int = 16) -> List[dict]:
    """Configurations of a kernel tiled by ``n`` tokens x ``g_pad`` heads (constexpr
    ``tile``), preferred first: the given one, then one pipeline stage, then half the
    tokens per tile down to ``min_rows`` MMA rows."""
    out = [{tile: n, "num_stages": num_stages}]
    if num_stages > 1:
        out.append({tile: n, "num_stages": 1})
    while n > 1 and (n // 2) * g_pad >= min_rows:
        n //= 2
        out.append({tile: n, "num_stages": 1})
    return out


def launch_fitting(kernel, grid, args: Sequence, configs: List[dict], **fixed) -> dict:
    """``kernel[grid](*args, **fixed, **config)`` with the first of ``configs`` (constexpr
    and launch options, preferred first; all must compute the same result) whose compiled
    kernel fits this GPU's shared memory. Returns the configuration used.

    Raises ``RuntimeError`` naming the kernel, the shared memory its smallest
    configuration needs and the GPU's limit when none fits.
    """
    if not configs:
        raise ValueError("launch_fitting needs at least one configuration")
    key = _key(kernel, args, configs, fixed)
    first = _CHOICE.get(key, 0)
    err = None
    for i in range(first, len(configs)):
        try:
            kernel[grid](*args, **fixed, **configs[i])
        except OutOfResources as e:
            err = e
            continue
        _CHOICE[key] = i
        return configs[i]
    name = key[0]
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "this device"
    raise RuntimeError(
        f"msa: the Triton kernel {name} does not fit {gpu}: its smallest launch "
        f"configuration needs {err.required} ({err.name}; the limit is {err.limit}"
        f"{' bytes' if err.name == 'shared memory' else ''}). Use backend='reference' "
        f"(or a GPU with more shared memory per block, e.g. A100/H100) for this "
        f"shape.") from err
