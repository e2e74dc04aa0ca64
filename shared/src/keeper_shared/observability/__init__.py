"""Metrics and health for every service: Prometheus ``/metrics``, ``/healthz``, ``/readyz``.

A service wraps its run in :func:`serve_observability` (off unless ``KEEPER_METRICS_PORT``
is set) and updates the metric objects of :mod:`keeper_shared.observability.metrics`.
"""

from keeper_shared.observability import metrics
from keeper_shared.observability.dead_letters import watch_dead_letters
from keeper_shared.observability.server import (
    HealthServer,
    ObservabilitySettings,
    ReadinessCheck,
    serve_observability,
)
from keeper_shared.observability.service import observe_service

__all__ = [
    "HealthServer",
    "ObservabilitySettings",
    "ReadinessCheck",
    "metrics",
    "observe_service",
    "serve_observability",
    "watch_dead_letters",
]
