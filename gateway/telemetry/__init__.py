"""Observability: structured logs, Prometheus metrics, OpenTelemetry traces and health checks.

``Telemetry`` (``gateway.telemetry.hub``) is the per-gateway entry point; ``docs/observability.md``
lists the log events, metric names and span attributes.
"""

from gateway.telemetry.hub import Telemetry
from gateway.telemetry.record import RequestOutcome, RequestRecord, record_of

__all__ = ["RequestOutcome", "RequestRecord", "Telemetry", "record_of"]
