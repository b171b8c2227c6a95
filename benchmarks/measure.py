"""Process measurements shared by the benchmark scripts (imported as ``from measure import ...``:
the scripts run as ``python benchmarks/<script>.py``, so this folder is on ``sys.path``)."""

from __future__ import annotations

import resource
import threading
import time


def rss_mb() -> float:
    """Current resident set size (``VmRSS``), MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_s() -> float:
    """User + system CPU seconds of this process."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def sys_s() -> float:
    """System CPU seconds of this process."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def peak_mb() -> float:
    """Peak resident set size of this process so far, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RssSampler:
    """Highest VmRSS seen while the block runs (sampled every ``every`` seconds)."""

    def __init__(self, every=0.02):
        self.every, self.peak, self._stop = every, 0.0, threading.Event()

    def __enter__(self):
        self.peak = rss_mb()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(self.every)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_mb())
