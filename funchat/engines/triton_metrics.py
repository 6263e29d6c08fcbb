"""Per-model Prometheus metrics on Triton's metrics port, named funchat_<service>_<thing>_<unit>.

Used from the Python-backend `model.py` files, which pass in `triton_python_backend_utils` (this
module imports nothing of Triton, so the package stays importable everywhere).
"""

from __future__ import annotations

import time
from contextlib import contextmanager

LATENCY_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64]


class ServiceMetrics:
    """Forward latency (histogram per kind, e.g. prefill / step), batch size (histogram), and for the
    stateful services the live calls (gauge)."""

    def __init__(self, pb_utils, service: str, kinds: tuple[str, ...] = ("prefill", "step"), stateful: bool = True):
        histogram = pb_utils.MetricFamily.HISTOGRAM
        self._latency_family = pb_utils.MetricFamily(
            name=f"funchat_{service}_forward_seconds", description=f"{service}: seconds per batched forward",
            kind=histogram)
        self._batch_family = pb_utils.MetricFamily(
            name=f"funchat_{service}_batch_size", description=f"{service}: calls batched into one execute",
            kind=histogram)
        self.latency = {kind: self._latency_family.Metric(labels={"kind": kind}, buckets=LATENCY_BUCKETS)
                        for kind in kinds}
        self.batch = self._batch_family.Metric(labels={}, buckets=BATCH_BUCKETS)
        self.live = None
        if stateful:
            self._live_family = pb_utils.MetricFamily(
                name=f"funchat_{service}_live_sequences", description=f"{service}: calls holding a KV cache row",
                kind=pb_utils.MetricFamily.GAUGE)
            self.live = self._live_family.Metric(labels={})

    @contextmanager
    def timed(self, kind: str, requests: int):
        """Time one execute() of a stateless service and record its batch size."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.latency[kind].observe(time.perf_counter() - t0)
            self.batch.observe(requests)

    @contextmanager
    def execute(self, requests: int, prefills: int, live: callable):
        """Time one execute(); record its batch size and, after it, the live calls."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.latency["prefill" if prefills else "step"].observe(time.perf_counter() - t0)
            self.batch.observe(requests)
            if self.live is not None:
                self.live.set(live())
