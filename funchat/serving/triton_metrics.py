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
    """Forward latency (histogram per kind: prefill / step), batch size (histogram), live calls (gauge)."""

    def __init__(self, pb_utils, service: str):
        histogram = pb_utils.MetricFamily.HISTOGRAM
        self._latency_family = pb_utils.MetricFamily(
            name=f"funchat_{service}_forward_seconds", description=f"{service}: seconds per batched forward",
            kind=histogram)
        self._batch_family = pb_utils.MetricFamily(
            name=f"funchat_{service}_batch_size", description=f"{service}: calls batched into one execute",
            kind=histogram)
        self._live_family = pb_utils.MetricFamily(
            name=f"funchat_{service}_live_sequences", description=f"{service}: calls holding a KV cache row",
            kind=pb_utils.MetricFamily.GAUGE)
        self.latency = {kind: self._latency_family.Metric(labels={"kind": kind}, buckets=LATENCY_BUCKETS)
                        for kind in ("prefill", "step")}
        self.batch = self._batch_family.Metric(labels={}, buckets=BATCH_BUCKETS)
        self.live = self._live_family.Metric(labels={})

    @contextmanager
    def execute(self, requests: int, prefills: int, live: callable):
        """Time one execute(); record its batch size and, after it, the live calls."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.latency["prefill" if prefills else "step"].observe(time.perf_counter() - t0)
            self.batch.observe(requests)
            self.live.set(live())
