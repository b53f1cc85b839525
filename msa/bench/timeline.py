"""What the GPU did during one call: its kernels by device time and where it idled.

``gpu_timeline(fn)`` profiles one ``fn()`` (``torch.profiler``, CUDA activity) and
``summarize`` reads the trace's device events (kernels, copies, memsets): the span from
the first event's start to the last one's end, the time some event ran (``busy_ms``),
the rest (``idle_ms``: the GPU waiting for the host, e.g. behind a host synchronisation)
and the longest idle gaps with the events on either side. Profiling adds host time, so
the span is longer than an unprofiled call; the kernels' times are their own.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Callable, Iterable

import torch

DEVICE_EVENTS = ("kernel", "gpu_memcpy", "gpu_memset")


def summarize(events: Iterable[dict], kernels: int = 12, gaps: int = 5,
              name_chars: int = 60) -> dict:
    """Summary of the device events among ``events`` (chrome-trace dicts; those whose
    ``cat`` is one of ``DEVICE_EVENTS``, with ``name``, ``ts`` and ``dur`` in
    microseconds): ``span_ms``, ``busy_ms``, ``idle_ms``, ``kernels_ms`` (the ``kernels``
    names of largest total time, names cut to ``name_chars``) and ``idle_gaps`` (the
    ``gaps`` longest, longest first: ``ms``, the last event to end before it, ``after``,
    and the event that ends it, ``before``)."""
    evs = sorted((e for e in events if e.get("cat") in DEVICE_EVENTS),
                 key=lambda e: e["ts"])
    if not evs:
        return dict(span_ms=0.0, busy_ms=0.0, idle_ms=0.0, kernels_ms={}, idle_gaps=[])
    totals, found = {}, []
    end, last = evs[0]["ts"], evs[0]
    busy = 0.0
    for e in evs:
        name = e["name"][:name_chars]
        totals[name] = totals.get(name, 0.0) + e["dur"]
        stop = e["ts"] + e["dur"]
        if e["ts"] > end:
            found.append(dict(ms=(e["ts"] - end) / 1e3, after=last["name"][:name_chars],
                              before=name))
        busy += max(0.0, stop - max(end, e["ts"]))
        if stop > end:
            end, last = stop, e
    span = end - evs[0]["ts"]
    top = sorted(totals.items(), key=lambda x: -x[1])[:kernels]
    return dict(span_ms=span / 1e3, busy_ms=busy / 1e3, idle_ms=(span - busy) / 1e3,
                kernels_ms={n: t / 1e3 for n, t in top},
                idle_gaps=sorted(found, key=lambda g: -g["ms"])[:gaps])


def gpu_timeline(fn: Callable, **kw) -> dict:
    """``summarize`` (its keyword arguments ``kw``) of one profiled ``fn()``, after the
    GPU has finished the work queued before it."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    return summarize(events, **kw)


def describe(summary: dict, kernels: int = 5) -> str:
    """One line of a ``summarize`` result: the GPU's busy and idle milliseconds, then its
    ``kernels`` largest kernels by total time."""
    top = ", ".join(f"{n} {t:.1f}" for n, t in list(summary["kernels_ms"].items())[:kernels])
    return f"busy {summary['busy_ms']:.1f} ms, idle {summary['idle_ms']:.1f} ms; {top}"
