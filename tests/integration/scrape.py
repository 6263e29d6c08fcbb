"""Reading a process's Prometheus /metrics page in a test."""

from __future__ import annotations

import urllib.request


def metric(address: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus metric's samples at http://address/metrics (those with `labels`)."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and (line[len(name)] in " {") and all(w in line for w in wanted))
