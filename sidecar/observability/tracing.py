"""OpenTelemetry: one span per Check. Off unless configured, and then free.

Tracing is on when ``OTEL_TRACES_EXPORTER`` names an exporter (``console``, ``otlp``…), as the
OpenTelemetry specification defines; everything else about the export (endpoint, headers,
service name, sampler, batching) comes from the standard ``OTEL_*`` variables, read by the
OpenTelemetry SDK itself. The SDK and the OTLP exporter are an optional install
(``pip install 'proviso[otel]'``); the sidecar depends only on ``opentelemetry-api``.

When tracing is off there is no tracer at all: the authorizer skips every span call, so the
hot path pays one ``is None`` test. No global tracer provider is installed either way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points

from opentelemetry.trace import Tracer

TRACER_NAME = "proviso"
_EXPORTER_GROUP = "opentelemetry_traces_exporter"


class TracingConfigError(ValueError):
    """Tracing was asked for but cannot be set up; the message says what is missing."""


@dataclass(frozen=True, slots=True)
class Tracing:
    """A tracer and how to flush and stop its exporters."""

    tracer: Tracer
    shutdown: Callable[[], object]


def start(exporters: Sequence[str], *, service_name: str | None = None) -> Tracing | None:
    """A tracer exporting through ``exporters`` (names from ``OTEL_TRACES_EXPORTER``).

    Returns None when no exporter is named (or only ``none``): tracing is off.

    Raises:
        TracingConfigError: the SDK, or an exporter, is not installed.
    """
    names = [name for name in exporters if name and name != "none"]
    if not names:
        return None
    try:
        from opentelemetry.sdk.resources import Resource  # noqa: PLC0415 - optional install
        from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
        from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415
    except ImportError:
        raise TracingConfigError(
            "OTEL_TRACES_EXPORTER is set but opentelemetry-sdk is not installed "
            "(pip install 'proviso[otel]')"
        ) from None
    attributes = {} if service_name is None else {"service.name": service_name}
    provider = TracerProvider(resource=Resource.create(attributes))
    for name in names:
        found = entry_points(group=_EXPORTER_GROUP, name=name)
        if not found:
            raise TracingConfigError(
                f"OTEL_TRACES_EXPORTER names '{name}', which is not installed "
                "(the OTLP exporter comes with pip install 'proviso[otel]')"
            )
        exporter_class = next(iter(found)).load()
        provider.add_span_processor(BatchSpanProcessor(exporter_class()))
    return Tracing(provider.get_tracer(TRACER_NAME), provider.shutdown)
