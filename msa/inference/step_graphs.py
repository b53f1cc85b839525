"""Eager decode steps replayed from CUDA graphs (``StepGraphs``).

A decode step of one layer is a few kernel launches whose GPU time at small batches is
smaller than their host cost: Triton's launcher handles each kernel's thirty-odd
arguments in Python, so an eager decode loop waits on the host, not on the GPU
(measured: docs/inference.md).
``StepGraphs`` keeps, per *key* (everything the launches' arguments are made of: tensor
addresses, shapes, strides, dtypes, the batch), a CUDA graph of those launches: the
first call of a key launches eagerly (the kernels compile then), the second captures
the launches once and every later call replays them, one graph launch instead of
several kernel launches. The launches must read their inputs only from tensors whose
addresses are in the key or that stay put (the caller copies fresh inputs into static
buffers first), allocate nothing and read nothing back to the host.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Callable, Hashable

import torch

_SEEN = object()        # a key met once: launched eagerly, not captured


class CaptureFailed(RuntimeError):
    """CUDA could not capture or instantiate the launches (not an error of the launches
    themselves): the caller launches eagerly from then on."""


def tensor_key(x) -> tuple:
    """What a launch takes from tensor ``x`` (or ``None``): its address, shape, strides,
    dtype and device."""
    if x is None:
        return ()
    return (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x.device)


class StepGraphs:
    """CUDA graphs of a step's launches, per key, least recently used dropped past
    ``capacity`` (at least one per layer a decoder serves, so that a model's layers do
    not evict each other). All graphs share one memory pool (the launches allocate
    nothing) and are captured on a side stream of ``device``."""

    def __init__(self, device: torch.device, capacity: int = 256):
        self.device, self.capacity = device, capacity
        self.graphs: "OrderedDict[Hashable, object]" = OrderedDict()
        self.captured = 0               # graphs captured so far (for tests and inspection)
        self.failed = None              # why a capture failed (then every call launches)
        self._pool = None
        self._stream = None

    def run(self, key: Hashable, launch: Callable[[], None]) -> None:
        """``launch()`` now, on the current stream: eagerly the first time ``key`` is met,
        then from its graph (captured at the second time). Where CUDA fails to capture,
        a warning says so and every call launches eagerly from then on."""
        if self.failed is not None:
            launch()
            return
        g = self.graphs.get(key)
        if g is None:
            self._remember(key, _SEEN)
            launch()
            return
        if g is _SEEN:
            try:
                g = self._capture(launch)
            except CaptureFailed as e:
                self.failed = str(e)
                self.graphs.clear()
                warnings.warn(f"msa: the decode step could not be captured in a CUDA graph "
                              f"({e}); it launches its kernels on every call from now on",
                              RuntimeWarning, stacklevel=3)
                launch()
                return
            self.graphs[key] = g
        self.graphs.move_to_end(key)
        g.replay()

    def _remember(self, key, value) -> None:
        self.graphs[key] = value
        while len(self.graphs) > self.capacity:
            self.graphs.popitem(last=False)

    def _capture(self, launch: Callable[[], None]) -> "torch.cuda.CUDAGraph":
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
            self._stream = torch.cuda.Stream(self.device)
        g = torch.cuda.CUDAGraph()
        current = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            try:
                # thread_local: CUDA calls of other threads do not invalidate the capture
                g.capture_begin(pool=self._pool, capture_error_mode="thread_local")
            except RuntimeError as e:
                raise CaptureFailed(str(e).splitlines()[0]) from e
            try:
                launch()
            except BaseException:
                try:                        # end the capture; the launch's error is the news
                    g.capture_end()
                except RuntimeError:
                    pass
                raise
            try:
                g.capture_end()
            except RuntimeError as e:
                raise CaptureFailed(str(e).splitlines()[0]) from e
        current.wait_stream(self._stream)
        self.captured += 1
        return g
