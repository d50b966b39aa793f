"""Prometheus metrics read from the status snapshot at scrape time.

A collector, not instruments updated on the hot path: a scrape asks the :class:`StatusBoard` for
a fresh snapshot and turns it into metric families, so ``/metrics``, ``edgetwin status`` and the
status page can never disagree, and the sample path pays nothing for metrics.  Names follow the
Prometheus conventions: ``edgetwin_`` prefix, base units (seconds, bytes), ``_total`` counters.
Labels carry source, metric, lane, reason, model and unit names, never a subject: those are
identities, and pseudonyms would only multiply series.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.observe.status import StatusBoard

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_HEALTH = {"healthy": 0, "degraded": 1, "down": 2}


def _gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


def _counter(name: str, doc: str, labels: list[str] | None = None) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=labels)


def families(snap: dict[str, Any]) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """The metric families of one snapshot."""
    g = _gauge("edgetwin_health", "0 healthy, 1 degraded, 2 down")
    g.add_metric([], _HEALTH.get(snap["health"], 2))
    yield g

    up = _gauge("edgetwin_unit_up", "1 while the supervised unit runs", ["unit"])
    for u in snap["units"]:
        up.add_metric([u["name"]], 1.0 if u["state"] == "running" else 0.0)
    yield up

    link = _gauge("edgetwin_source_up", "1 while the source's device link is up", ["source", "driver"])
    samples = _counter("edgetwin_samples", "samples taken in per stream", ["source", "metric"])
    age = _gauge("edgetwin_stream_last_sample_age_seconds", "age of the newest sample", ["source", "metric"])
    drops = _counter(
        "edgetwin_stream_dropped", "samples dropped per stream and reason", ["source", "metric", "reason"]
    )
    for s in snap["sources"]:
        link.add_metric([s["name"], s["driver"]], 1.0 if s["link"] == "up" else 0.0)
        for st in s["streams"]:
            samples.add_metric([s["name"], st["metric"]], st["samples"])
            if st["last_sample_age_s"] is not None:
                age.add_metric([s["name"], st["metric"]], st["last_sample_age_s"])
            for reason, n in st["dropped"].items():
                drops.add_metric([s["name"], st["metric"], reason], n)
    yield from (link, samples, age, drops)

    pipeline = snap.get("pipeline", {})
    windows = _counter("edgetwin_windows", "windows closed")
    windows.add_metric([], float(pipeline.get("windower_windows", 0)))
    yield windows
    records = _counter("edgetwin_records", "records queued for the uplink per lane", ["lane"])
    for key, value in pipeline.items():
        if key.startswith("queued_"):
            records.add_metric([key.removeprefix("queued_")], float(value))
    yield records
    refused = _counter("edgetwin_anonymizer_dropped", "records refused by the anonymizer (fail-closed)")
    refused.add_metric([], float(pipeline.get("anonymizer_dropped", 0)))
    held = _gauge(
        "edgetwin_metric_names_holding_identity",
        "metric names the config declares that hold an identity it names (their records are dropped)",
    )
    held.add_metric([], float(len(snap.get("held_names", []))))
    yield from (refused, held)

    ob = snap["outbox"]
    depth = _gauge("edgetwin_outbox_records", "records in the outbox per lane", ["lane"])
    size = _gauge("edgetwin_outbox_bytes", "bytes in the outbox per lane", ["lane"])
    oldest = _gauge("edgetwin_outbox_oldest_age_seconds", "age of the oldest record per lane", ["lane"])
    dropped = _counter("edgetwin_outbox_dropped", "records dropped undelivered", ["lane", "reason"])
    for lane, ls in ob["lanes"].items():
        depth.add_metric([lane], ls["queued"])
        size.add_metric([lane], ls["bytes"])
        oldest.add_metric([lane], ls["oldest_age_s"] or 0.0)
        for reason, n in ls["dropped"].items():
            dropped.add_metric([lane, reason], n)
    budget = _gauge("edgetwin_outbox_budget_bytes", "the outbox's byte budget")
    budget.add_metric([], ob["budget_bytes"])
    degraded = _gauge(
        "edgetwin_outbox_degraded", "1 while the outbox refuses lower lanes (disk full, failing writes)"
    )
    degraded.add_metric([], 1.0 if ob.get("degraded") else 0.0)
    yield from (depth, size, oldest, dropped, budget, degraded)

    upl = snap["uplink"]
    connected = _gauge("edgetwin_uplink_connected", "1 while the uplink is connected", ["kind"])
    connected.add_metric([upl["kind"]], 1.0 if upl["state"] == "connected" else 0.0)
    since = _gauge(
        "edgetwin_uplink_state_seconds", "how long the uplink has been in its state", ["kind", "state"]
    )
    since.add_metric([upl["kind"], upl["state"]], upl["since_s"])
    delivered = _counter("edgetwin_uplink_delivered", "records acknowledged by the broker", ["kind"])
    delivered.add_metric([upl["kind"]], upl["delivered"])
    backlog = _gauge("edgetwin_uplink_replay_backlog_records", "records waiting to be replayed")
    backlog.add_metric([], upl["replay_backlog"])
    held = _gauge("edgetwin_uplink_held_windows", "features windows held for their batch (batch_s)")
    held.add_metric([], upl.get("held_windows", 0))
    latency = _gauge("edgetwin_uplink_publish_latency_seconds", "median publish-to-PUBACK time (sampled)")
    if upl.get("publish_latency_p50_s") is not None:
        latency.add_metric([], upl["publish_latency_p50_s"])
    yield from (connected, since, delivered, backlog, held, latency)

    demoted = _gauge("edgetwin_model_demoted", "1 while the model is demoted to its fallback", ["model"])
    over = _gauge(
        "edgetwin_model_over_budget",
        "1 while the model runs over its latency budget (its verdicts serve)",
        ["model"],
    )
    model_latency = _gauge("edgetwin_model_latency_seconds", "median model latency per window", ["model"])
    for m in snap["models"]:
        demoted.add_metric([m["name"]], 1.0 if m["state"] == "demoted" else 0.0)
        over.add_metric([m["name"]], 1.0 if m.get("over_budget", m["state"] == "over_budget") else 0.0)
        if m.get("latency_p50_us") is not None:
            model_latency.add_metric([m["name"]], m["latency_p50_us"] / 1e6)
    yield from (demoted, over, model_latency)

    alarms = _gauge("edgetwin_alarms_active", "alarms active now per kind", ["kind"])
    counts: dict[str, int] = {}
    for a in snap["alarms"]:
        counts[a["kind"]] = counts.get(a["kind"], 0) + 1
    for kind in ("limit", "anomaly", "sensor_fault", "sensor_lost", "device_lost"):
        alarms.add_metric([kind], counts.get(kind, 0))
    yield alarms


class SnapshotCollector(Collector):
    """Collects from the board's freshly composed snapshot at every scrape."""

    def __init__(self, board: StatusBoard) -> None:
        self._board = board

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """The families of a snapshot composed now."""
        yield from families(self._board.compose())


def registry_for(board: StatusBoard) -> CollectorRegistry:
    """A registry with the gateway's metrics and the process's (RSS, CPU, open files)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(board))
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition format."""
    return generate_latest(registry)
