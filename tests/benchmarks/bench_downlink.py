"""Publish-to-applied time of a signed config revision, against the gateway's own cold start.

A real ``edgetwin run`` with one simulated source, TLS mosquitto on loopback, the twin publishing
revisions that add a source each time.  Baseline: process start -> the twin sees the reported
state with every unit running (a cold start, as the twin sees it).  Measured: the broker's PUBACK
of the desired state -> the twin sees the revision applied (verify, check, write, then the new
source started in place, probation with ``settle_s`` = 1 s); and the same for revisions that
change ``[runtime]``, which restart the whole process (orderly stop, restart in place).

Model bundles (``--models``): the same gateway with a simulated pump scored by the pump model.
Measured: the twin starts publishing a 1 MB bundle (9 chunks of the AWS profile's 120 kB, then the
signed manifest, retained, QoS 1) -> the twin sees the version in shadow in the reported state
(every chunk checked against its signed hash, assembled, verified whole, card checked, model
opened).  Baseline, same run: the same 1 MB published as one retained message -> received by a
subscriber of the same broker.  Shadow overhead: CPU time per window of the pump model alone
against the pump model with a candidate (the shipped int8 model) beside it, in-process.

On IoT Hub (``--azure``): the same 1 MB bundle on the azure profile against the hub peer of the
tests on the same TLS mosquitto: the signed manifest as a desired patch, the gateway reports the
transfer, then the chunks (19 of 56 kB) as cloud-to-device messages -> the version in shadow in the
reported property.  Baseline, same run: the same chunks sent the same way to a plain subscriber.

Memory after an update (``--rss``): a fresh gateway serving the shipped pump model (numpy, as its
card chose) is sent the shipped pump card again as version 1: as a bundle of the ONNX file alone,
with the card's numpy weights, and as a card choosing LiteRT with its weights and ``.tflite`` file,
rotating which goes first per round; measured:
the gateway process's VmRSS (``/proc/<pid>/status``) once the version is promoted and has scored
two windows more.  Baseline, same process: its VmRSS just before the bundle is published.

Run: ``python tests/benchmarks/bench_downlink.py [--rounds 3] [--models | --azure | --rss]``
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
from bundle_support import (  # noqa: E402
    LOOSE_HEALTH,
    MODELS,
    PUMP,
    PUMP_SITE,
    card_for,
    onnx_model,
    shipped_int8,
    write,
)
from downlink_support import applied, new_site, running, source  # noqa: E402

from gateway.downlink.bundles import chunk_bytes_for, make_bundle  # noqa: E402
from gateway.downlink.model_commands import chunk_messages  # noqa: E402
from gateway.downlink.signing import sign  # noqa: E402
from gateway.downlink.twin_link import (  # noqa: E402
    publish_desired,
    publish_many,
    watch,
)
from gateway.inference.card import CARD_SUFFIX, load_card  # noqa: E402
from gateway.inference.shadow import Acceptance, Slot  # noqa: E402
from gateway.records.topics import DEFAULT_PREFIX  # noqa: E402
from gateway.uplink.broker import MosquittoBroker  # noqa: E402
from gateway.uplink.certs import demo_pki  # noqa: E402


def main() -> None:
    """Measure and print the table for BENCHMARKS.md."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", action="store_true", help="model bundles and shadow overhead instead")
    parser.add_argument("--azure", action="store_true", help="a model bundle on the azure profile instead")
    parser.add_argument("--rss", action="store_true", help="gateway memory after a bundle update instead")
    args = parser.parse_args()
    if args.rss:
        bench_update_rss(args.rounds)
        return
    if args.azure:
        bench_azure_bundle(args.rounds)
        return
    if args.models:
        bench_models(args.rounds)
        return
    with tempfile.TemporaryDirectory(prefix="bench-downlink-") as tmp_name:
        tmp = Path(tmp_name)
        pki = demo_pki(tmp / "pki")
        broker = MosquittoBroker(tmp / "broker", pki)
        broker.start()
        site = new_site(tmp, pki, broker)
        cold: list[float] = []
        apply: list[float] = []
        process: list[float] = []
        try:
            for _ in range(args.rounds):
                # Clear the retained reported state, so the twin waits for this start's own.
                publish_desired(site.twin, f"{DEFAULT_PREFIX}/{site.gateway}/reported", b"")
                t0 = time.monotonic()
                site.start()
                site.reported(running(site.unit("bed7-sim")), "running")
                cold.append(time.monotonic() - t0)
                site.stop()
            site.start()
            site.reported(running(site.unit("bed7-sim")), "running")
            sources = source("bed7-sim")
            for version in range(1, args.rounds + 1):
                sources += source(f"bed{version + 10}-sim", device=f"A4:C1:38:00:01:{version + 10}")
                envelope = site.envelope(version, sources)
                site.publish(envelope)  # returns on the broker's PUBACK
                t0 = time.monotonic()
                site.reported(applied(version), f"v{version} applied")
                apply.append(time.monotonic() - t0)
            # A process-level section changed ([runtime]): the whole process restarts in place.
            for n in range(1, args.rounds + 1):
                version = args.rounds + n
                text = site.text(sources).replace(
                    "drain_deadline_s = 3.0", f"drain_deadline_s = {3.0 + n / 10}"
                )
                expires = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
                site.publish(
                    sign(
                        text.encode(), keys=[site.key], gateway=site.gateway, version=version, expires=expires
                    )
                )
                t0 = time.monotonic()
                site.reported(applied(version), f"v{version} applied")
                process.append(time.monotonic() - t0)
        finally:
            site.stop()
            broker.stop()
    base = statistics.median(cold)
    print("| path | median s | max s | vs cold start |")
    print("|---|---:|---:|---:|")
    print(f"| cold start -> reported running (baseline) | {base:.2f} | {max(cold):.2f} | 1.00x |")
    med = statistics.median(apply)
    print(
        f"| source added: published -> applied (in place) | {med:.2f} | {max(apply):.2f} | {med / base:.2f}x |"
    )
    med = statistics.median(process)
    print(
        f"| [runtime] changed: published -> applied (process restart) | {med:.2f} | {max(process):.2f} "
        f"| {med / base:.2f}x |"
    )


def _wait(seen: list[tuple[bool, bytes]], until: Any, timeout_s: float = 120.0) -> float:
    """Poll a watcher's messages until one satisfies ``until``; the monotonic time it was seen."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if any(until(payload) for _, payload in list(seen)):
            return time.monotonic()
        time.sleep(0.005)
    raise AssertionError("not seen in time")


def _in_shadow(version: int) -> Any:
    def check(payload: bytes) -> bool:
        try:
            cand = (json.loads(payload).get("models") or {}).get(PUMP, {}).get("candidate") or {}
        except ValueError:
            return False
        return bool(cand.get("version") == version)

    return check


def bench_models(rounds: int) -> None:
    """Publish -> in shadow for a 1 MB bundle against one 1 MB retained message; shadow overhead."""
    size = 1024 * 1024
    with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp_name:
        tmp = Path(tmp_name)
        pki = demo_pki(tmp / "pki")
        broker = MosquittoBroker(tmp / "broker", pki)
        broker.start()
        site = new_site(tmp, pki, broker)
        site.config.write_text(site.text(PUMP_SITE))
        one: list[float] = []
        bundle: list[float] = []
        try:
            for r in range(rounds):
                client, seen = watch(site.twin, f"bench/one/{r}")
                payload = onnx_model(pad_bytes=size, pad_seed=100 + r)
                n = len(payload)
                t0 = time.monotonic()
                publish_desired(site.twin, f"bench/one/{r}", payload)
                one.append(_wait(seen, lambda p, n=n: len(p) == n) - t0)
                client.disconnect()
                client.loop_stop()
            site.start()
            site.reported(running(site.unit("pump3-sim")), "running")
            root = f"{DEFAULT_PREFIX}/{site.gateway}"
            client, seen = watch(site.twin, f"{root}/reported")
            for version in range(1, rounds + 1):
                model = onnx_model(pad_bytes=size, pad_seed=version)
                _, chunks, env = _signed_bundle(site, model, version, chunk_bytes_for("aws"))
                t0 = time.monotonic()
                publish_many(site.twin, chunk_messages(root, env, model))
                bundle.append(_wait(seen, _in_shadow(version)) - t0)
            client.disconnect()
            client.loop_stop()
        finally:
            site.stop()
            broker.stop()
    alone, beside = _shadow_overhead()
    base = statistics.median(one)
    med = statistics.median(bundle)
    print(
        f"| path ({len(chunks)} chunks of {chunk_bytes_for('aws')} bytes) | median s | max s | vs baseline |"
    )
    print("|---|---:|---:|---:|")
    print(
        f"| 1 MB as one retained message, publish -> received (baseline) | {base:.3f} | {max(one):.3f} | 1.00x |"
    )
    print(f"| 1 MB model bundle, publish -> in shadow | {med:.3f} | {max(bundle):.3f} | {med / base:.2f}x |")
    print()
    print("| pump model per window (CPU) | median us | vs alone |")
    print("|---|---:|---:|")
    print(f"| active alone (baseline) | {alone:.0f} | 1.00x |")
    print(f"| active + candidate in shadow | {beside:.0f} | {beside / alone:.2f}x |")


def bench_azure_bundle(rounds: int) -> None:
    """Desired patch -> in shadow for a 1 MB bundle over IoT Hub's twin and C2D, against the bare chunks."""
    from azure_hub import AzureHub, AzureSite  # noqa: PLC0415

    from gateway.downlink.azure import desired_patch  # noqa: PLC0415

    size, chunk = 1024 * 1024, chunk_bytes_for("azure")
    bare: list[float] = []
    bundle: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-azure-") as tmp_name:
        tmp = Path(tmp_name)
        pki = demo_pki(tmp / "pki")
        broker = MosquittoBroker(tmp / "broker", pki)
        broker.start()
        plain = new_site(tmp, pki, broker)
        site = AzureSite(tmp, pki, broker, plain.config, plain.key, plain.gateway)
        site.config.write_text(site.text(PUMP_SITE))
        hub = AzureHub(site.twin)
        try:
            for r in range(rounds):
                payload = onnx_model(pad_bytes=size, pad_seed=100 + r)
                parts = [payload[i : i + chunk] for i in range(0, len(payload), chunk)]
                device = f"bench-{r}"  # a subscriber of the twin's own, not the gateway
                client, seen = watch(site.twin, f"devices/{device}/messages/devicebound/#")
                while not seen:  # subscribed once a probe comes back (non-retained: none lost after)
                    hub.send_chunks(device, "probe", [b"p"])
                    time.sleep(0.2)
                seen.clear()
                t0 = time.monotonic()
                hub.send_chunks(device, "x", parts)
                end = t0 + 60.0
                while _chunks_seen(seen) < len(parts) and time.monotonic() < end:
                    time.sleep(0.005)
                assert _chunks_seen(seen) >= len(parts), "the bare chunks did not arrive"
                bare.append(time.monotonic() - t0)
                client.disconnect()
                client.loop_stop()
            site.start()
            hub.wait(
                lambda rep: ((rep.get("models") or {}).get(PUMP) or {}).get("active") == 0, "serving", 120
            )
            for version in range(1, rounds + 1):
                model = onnx_model(pad_bytes=size, pad_seed=version)
                manifest, chunks, env = _signed_bundle(site, model, version, chunk)
                bundle_id = json.loads(manifest)["model"]["sha256"][:32]
                t0 = time.monotonic()
                hub.patch_desired(desired_patch("model", env))
                hub.wait(lambda rep, v=version: _transfer(rep).get("version") == v, "transfer", 120)
                hub.send_chunks(site.gateway, bundle_id, chunks)
                hub.wait(lambda rep, v=version: _candidate(rep) == v, "in shadow", 120)
                bundle.append(time.monotonic() - t0)
        finally:
            hub.stop()
            site.stop()
            broker.stop()
    base, med = statistics.median(bare), statistics.median(bundle)
    print(f"| path ({len(chunks)} chunks of {chunk} bytes) | median s | max s | vs baseline |")
    print("|---|---:|---:|---:|")
    print(
        f"| 1 MB as the same chunks, QoS 1, publish -> received (baseline) | {base:.3f} | {max(bare):.3f} | 1.00x |"
    )
    print(
        f"| 1 MB bundle on IoT Hub's twin + C2D, patch -> in shadow | {med:.3f} | {max(bundle):.3f} | {med / base:.2f}x |"
    )


def _rss_mb(pid: int) -> float:
    """A process's resident set size in MB, from ``/proc``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


#: The bundles the RSS benchmark sends: label, the card's backend, the files beside the ONNX file.
UPDATES = {
    "onnx": ("ONNX file alone", None, ()),
    "dense": ("ONNX file + numpy weights", None, ("dense",)),
    "litert": ("ONNX + numpy weights + .tflite, card choosing LiteRT", "litert", ("dense", "tflite")),
}


def _update_rss(tmp: Path, pki: Any, kind: str) -> tuple[float, float, str]:
    """RSS (MB) of a fresh gateway before and after the pump card is promoted as v1 (bundle ``kind``); its backend."""
    broker = MosquittoBroker(tmp / "broker", pki)
    broker.start()
    site = new_site(tmp, pki, broker)
    site.config.write_text(site.text(PUMP_SITE))
    _, backend, carried = UPDATES[kind]
    doc = json.loads((MODELS / f"{PUMP}.card.json").read_text())
    if backend is not None:
        doc["backend"] = backend
    card = json.dumps(doc).encode()
    model = (MODELS / f"{PUMP}.fp32.onnx").read_bytes()
    files = {"dense": f"{PUMP}.fp32.dense.npz", "tflite": f"{PUMP}.fp32.tflite"}
    extras = {key: (MODELS / files[key]).read_bytes() for key in carried}
    rules = Acceptance(windows=5, max_latency_us=1e9, min_agreement=0.0, max_alarm_rate=1.0)
    manifest, _ = make_bundle(
        PUMP, card, model, chunk_bytes=chunk_bytes_for("aws"), acceptance=rules, **extras
    )
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    env = sign(manifest, keys=[site.key], gateway=site.gateway, version=1, expires=expires, kind="model")
    try:
        site.start()
        site.reported(running(site.unit("pump3-sim")), "running")
        assert site.proc is not None
        time.sleep(3.0)  # past commissioning: the serving model has scored windows
        before = _rss_mb(site.proc.pid)
        root = f"{DEFAULT_PREFIX}/{site.gateway}"
        publish_many(site.twin, chunk_messages(root, env, model, None, **extras))
        rep = site.reported(
            lambda r: ((r.get("models") or {}).get(PUMP) or {}).get("active") == 1, "v1 promoted", 120
        )
        time.sleep(2.0)  # two windows more on the promoted version
        return before, _rss_mb(site.proc.pid), rep["models"][PUMP]["backend"]
    finally:
        site.stop()
        broker.stop()


def bench_update_rss(rounds: int) -> None:
    """Gateway RSS after a bundle update: the ONNX file alone, with the numpy weights, with a LiteRT card's files."""
    kinds = list(UPDATES)
    out: dict[str, list[tuple[float, float, str]]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory(prefix="bench-rss-") as tmp_name:
        tmp = Path(tmp_name)
        pki = demo_pki(tmp / "pki")
        for r in range(rounds):
            for kind in kinds[r % len(kinds) :] + kinds[: r % len(kinds)]:  # rotate which goes first
                run = tmp / f"r{r}-{kind}"
                run.mkdir()
                out[kind].append(_update_rss(run, pki, kind))
    print(
        "| bundle | backend after | RSS before, MB (median) | RSS after, MB (median) | growth, MB (each run) |"
    )
    print("|---|---|---:|---:|---|")
    for kind in kinds:
        runs = out[kind]
        growth = ", ".join(f"{a - b:+.1f}" for b, a, _ in runs)
        backends = "/".join(sorted({k for _, _, k in runs}))
        print(
            f"| {UPDATES[kind][0]} | {backends} | {statistics.median(b for b, _, _ in runs):.1f} | "
            f"{statistics.median(a for _, a, _ in runs):.1f} | {growth} |"
        )


def _signed_bundle(site: Any, model: bytes, version: int, chunk: int) -> tuple[bytes, list[bytes], bytes]:
    """Manifest, chunks and signed envelope of a bundle that stays in shadow (its period never ends)."""
    card = card_for(model, health=LOOSE_HEALTH)
    manifest, chunks = make_bundle(
        PUMP, card, model, chunk_bytes=chunk, acceptance=Acceptance(windows=100_000)
    )
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    env = sign(
        manifest, keys=[site.key], gateway=site.gateway, version=version, expires=expires, kind="model"
    )
    return manifest, chunks, env


def _chunks_seen(seen: list[tuple[bool, bytes]]) -> int:
    return sum(1 for _, payload in list(seen) if len(payload) > 1)  # a late 1-byte probe is not one


def _transfer(rep: dict[str, Any]) -> dict[str, Any]:
    return dict(((rep.get("models") or {}).get(PUMP) or {}).get("transfer") or {})


def _candidate(rep: dict[str, Any]) -> Any:
    return (((rep.get("models") or {}).get(PUMP) or {}).get("candidate") or {}).get("version")


def _shadow_overhead(windows: int = 2000) -> tuple[float, float]:
    """Median CPU time per window (us) of a slot without and with a candidate in shadow."""
    from test_inference_runtime import commission, pump_model, pump_window  # noqa: PLC0415

    def run(slot: Slot, rng: np.random.Generator) -> float:
        times = []
        for k in range(windows):
            rec = [pump_window(100 + k, rng)]
            t0 = time.thread_time()
            slot.score_batch(rec)
            times.append((time.thread_time() - t0) * 1e6)
        return statistics.median(times)

    with tempfile.TemporaryDirectory(prefix="bench-shadow-") as tmp_name:
        tmp = Path(tmp_name)
        rng = np.random.default_rng(2)
        active = pump_model()
        commission(active, rng)
        alone = run(Slot(active), rng)
        slot = Slot(active)
        model, card = shipped_int8()
        where = write(tmp / "v2", card, model)
        cand = active.sibling(load_card(where / f"{PUMP}{CARD_SUFFIX}"), where, tag="v2")
        slot.stage(cand, 2, Acceptance(windows=10 * windows))
        beside = run(slot, rng)
    return alone, beside


if __name__ == "__main__":
    main()
