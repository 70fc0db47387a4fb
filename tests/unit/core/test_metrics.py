"""Prometheus instruments: bounded labels, the policy-info gauge, and a parseable exposition."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from sidecar.observability.metrics import UNKNOWN, Metrics, bounded


def _families(metrics: Metrics) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    text = metrics.exposition().decode()
    return {
        family.name: [(s.name, dict(s.labels), s.value) for s in family.samples]
        for family in text_string_to_metric_families(text)
    }


def test_bounded_keeps_known_values_and_folds_the_rest() -> None:
    """A known label value passes; anything else (case differences included) is ``unknown``."""
    known = {"requestRefund", "getInvoice"}
    assert bounded("requestRefund", known) == "requestRefund"
    assert bounded("RequestRefund", known) == UNKNOWN == "unknown"
    assert bounded("", known) == UNKNOWN
    assert bounded("x" * 10_000, known) == UNKNOWN
    assert bounded("anything", ()) == UNKNOWN


def test_the_exposition_parses_and_names_every_instrument() -> None:
    """The exposition is valid text format and holds each instrument of the sidecar."""
    families = _families(Metrics())
    assert {
        "proviso_decisions",
        "proviso_check_duration_seconds",
        "proviso_policy_info",
        "proviso_tokens_issued",
        "proviso_tokens_rejected",
        "proviso_tokens_revoked",
        "proviso_audit_write_duration_seconds",
        "proviso_audit_write_errors",
    } <= set(families)


def test_counters_and_histograms_show_their_observations() -> None:
    """A counted decision and an observed latency appear with their labels and values."""
    metrics = Metrics()
    metrics.decisions.labels("DENY", "requestRefund", "OUT_OF_SCOPE").inc()
    metrics.decisions.labels("DENY", "requestRefund", "OUT_OF_SCOPE").inc()
    metrics.check_duration.observe(0.003)
    families = _families(metrics)
    assert (
        "proviso_decisions_total",
        {"decision": "DENY", "tool": "requestRefund", "reason": "OUT_OF_SCOPE"},
        2.0,
    ) in families["proviso_decisions"]
    histogram = {(name, labels.get("le")): value for name, labels, value in families[
        "proviso_check_duration_seconds"
    ]}  # fmt: skip
    assert histogram[("proviso_check_duration_seconds_count", None)] == 1.0
    assert histogram[("proviso_check_duration_seconds_bucket", "0.0025")] == 0.0
    assert histogram[("proviso_check_duration_seconds_bucket", "0.005")] == 1.0


def test_set_policy_replaces_the_previous_version() -> None:
    """After a reload, only the new version is exposed, at 1."""
    metrics = Metrics()
    metrics.set_policy("aaaa", "first")
    metrics.set_policy("bbbb", "second")
    assert _families(metrics)["proviso_policy_info"] == [
        ("proviso_policy_info", {"version": "bbbb", "label": "second"}, 1.0)
    ]


def test_setting_the_same_policy_twice_keeps_one_series() -> None:
    """Re-announcing the version in force leaves exactly one series."""
    metrics = Metrics()
    metrics.set_policy("aaaa", "x")
    metrics.set_policy("aaaa", "x")
    assert len(_families(metrics)["proviso_policy_info"]) == 1


def test_instances_do_not_share_state() -> None:
    """Each Metrics has its own registry: two can coexist and count separately."""
    one, two = Metrics(), Metrics()
    one.tokens_issued.labels("a@s").inc()
    assert _families(two)["proviso_tokens_issued"] == []
    assert _families(one)["proviso_tokens_issued"] == [
        ("proviso_tokens_issued_total", {"agent": "a@s"}, 1.0)
    ]
