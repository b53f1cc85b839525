"""Small runtime helpers for the CLI: a progress bar and a peak-memory meter."""
from __future__ import annotations

import os
import sys
import threading
import time

import torch


class Progress:
    """A dependency-free progress bar on stderr: ``with Progress(n, "msa") as bar:
    bar.update()``. On a terminal one line redraws in place; in a log file (stderr not a
    TTY) a line is written at each tenth of the work, no carriage returns."""

    def __init__(self, total: int, label: str, enabled: bool = True, width: int = 30):
        self.total, self.label, self.width = max(1, total), label, width
        self.enabled = enabled and total > 1
        self.tty = sys.stderr.isatty()
        self.done, self.t0, self.logged = 0, time.perf_counter(), 0

    def __enter__(self):
        if self.tty:
            self._draw()
        return self

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.tty:
            self._draw()
        elif self.enabled and self.done * 10 // self.total > self.logged:
            self.logged = self.done * 10 // self.total
            sys.stderr.write(f"  {self.label}: {self.done}/{self.total} "
                             f"({time.perf_counter() - self.t0:.1f}s)\n")
            sys.stderr.flush()

    def _draw(self) -> None:
        if not self.enabled:
            return
        frac = self.done / self.total
        bar = "#" * int(frac * self.width)
        elapsed = time.perf_counter() - self.t0
        sys.stderr.write(f"\r  {self.label:<6} [{bar:<{self.width}}] {self.done}/{self.total} "
                         f"{elapsed:6.1f}s")
        sys.stderr.flush()

    def __exit__(self, *exc):
        if self.enabled and self.tty:
            sys.stderr.write("\r" + " " * (self.width + 40) + "\r")
            sys.stderr.flush()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory above the starting level while the block runs.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: resident set size sampled every 2 ms
    by a thread (Linux ``/proc``), an upper bound that includes allocator caching.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = _rss_bytes()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes() - self.base)
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes() - self.base)
