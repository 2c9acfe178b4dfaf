"""Observability: structured logs, Prometheus metrics, OpenTelemetry traces and health checks.

``Telemetry`` (``gateway.telemetry.hub``) is the per-gateway entry point; its request layers,
``TelemetryMiddleware`` and ``AdmissionMark`` (``gateway.telemetry.middleware``), take it as
``telemetry=``. ``docs/observability.md`` lists the log events, metric names and span attributes.
"""

from gateway.telemetry.hub import Telemetry
from gateway.telemetry.middleware import AdmissionMark, TelemetryMiddleware
from gateway.telemetry.record import RequestOutcome, RequestRecord, record_of

__all__ = ["AdmissionMark", "RequestOutcome", "RequestRecord", "Telemetry", "TelemetryMiddleware", "record_of"]
