"""The anonymizer's identity scan per sealed window, against the scan it replaced, in one run.

Every record is scanned for every registered identity's forms (raw, case, compact, hex, base64).
The scan before searched the whole encoded record once per form (``form in data``: thousands of
searches with a fleet's identities) and refused on any hit, even a form spelt across two CBOR
items (the key ``dev`` and the header byte of a pseudonym: ``devp``).  Ours reads the record's
4-byte strings once against an index of the forms' first 4 bytes and confirms a hit inside one
CBOR item (``Anonymizer.check_cbor``).  Both run on the same encoded windows and the same forms in
the same process, rounds alternating, so the ratio holds while the machine's load drifts:

* before: each form searched for in the record, lower-cased for the text and hex forms (the
  code as it was, on the forms ``identity_forms`` and ``text_forms`` give);
* ours: ``Anonymizer.check_cbor``.

Two sets of windows of a fleet's worth of identities: ``clean`` (devices named by MAC address and
serial number, no form anywhere: the usual case) and ``spanning`` (the devices named ``DEV-P``,
``DEV-Q``: a raw hit in every record, which the scan before refused and ours confirms and
passes).  Beside them, the whole seal (build, canonical CBOR, scan) of the same windows, for scale.

Run: ``.venv/bin/python tests/benchmarks/bench_anonymize.py [--subjects 40] [--rounds 7]``
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gateway.anonymize import Anonymizer, Pseudonymizer, identity_forms, text_forms
from gateway.contracts import StreamFeatures, WindowRecord
from gateway.errors import AnonymizationError
from gateway.records import encode
from gateway.sample import MDC, Stream, industrial_metric

WALL0 = 1.7e9
PATIENT_METRICS = ("MDC_ECG_HEART_RATE", "MDC_PULS_OXIM_SAT_O2", "MDC_RESP_RATE", "MDC_TEMP_BODY")
PUMP_METRICS = (
    ("Pump/Motor/Current", "A"),
    ("Pump/Accel", "g"),
    ("Pump/Pressure", "bar"),
    ("Pump/Temp", "Cel"),
)


def _windows(subjects: int, spanning: bool) -> list[WindowRecord]:
    """One 30 s window per subject: half patients (4 streams), half pumps (4 streams)."""
    out = []
    for i in range(subjects):
        if i % 2 == 0:
            device = "DEV-P" if spanning else f"A4:C1:38:{i // 256:02X}:{i % 256:02X}:7E"
            streams = [
                Stream(f"bed{i}-mon", f"MRN-{4800 + i}", device, MDC[m], rate_hz=1.0) for m in PATIENT_METRICS
            ]
        else:
            device = "DEV-Q" if spanning else f"SN-PLC-{1000 + i}"
            streams = [
                Stream(
                    f"pump{i}-plc", f"line2-m{i}", device, industrial_metric(path, unit), "industrial", 1.0
                )
                for path, unit in PUMP_METRICS
            ]
        feats = {"mean": 97.0 + i % 3, "std": 0.4, "min": 96.0, "max": 98.0, "slope": -0.01}
        sfs = tuple(StreamFeatures(s, 30, 0.0, feats) for s in streams)
        out.append(WindowRecord(streams[0].subject, streams[0].kind, 3, 30.0, WALL0 + 30.0, 30.0, sfs))
    return out


def _anonymizer(windows: Sequence[WindowRecord]) -> Anonymizer:
    anon = Anonymizer(
        Pseudonymizer(b"b" * 32), time_mode="relative", start_wall=WALL0, local_identities=("edgetwin",)
    )
    for w in windows:  # every identity registered, as after the first hop
        anon.window(w)
    return anon


def _identities(windows: Sequence[WindowRecord]) -> set[str]:
    """What the anonymizer registered: the host and gateway names, subjects, sources and devices."""
    out = {socket.gethostname(), "edgetwin"}
    for w in windows:
        out.add(w.subject)
        for sf in w.streams:
            out |= {sf.stream.source, sf.stream.device}
    return out


class ScanBefore:
    """The scan this change replaced: each form searched for in the whole record."""

    def __init__(self, identities: set[str]) -> None:
        self.forms: set[bytes] = set()
        self.folded: set[bytes] = set()
        for identity in identities:
            self.forms |= identity_forms(identity)
            self.folded |= {f for f in text_forms(identity) if len(f) >= 4}

    def check(self, encoded: bytes) -> None:
        """Raise AnonymizationError on any form anywhere in ``encoded``."""
        lowered = encoded.lower()
        for form in self.folded:
            if form in lowered:
                raise AnonymizationError("folded form")
        for form in self.forms:
            if form in encoded:
                raise AnonymizationError("form")


def _per_record_us(scan: Callable[[bytes], None], data: Sequence[bytes], repeat: int) -> float:
    """Microseconds per record of ``scan`` over ``data`` (a refusal counts as done)."""
    start = time.perf_counter()
    for _ in range(repeat):
        for d in data:
            with contextlib.suppress(AnonymizationError):
                scan(d)
    return (time.perf_counter() - start) / (repeat * len(data)) * 1e6


def main() -> int:
    """Print the table for BENCHMARKS.md."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--subjects", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    print(
        f"anonymizer scan benchmark: {args.subjects} subjects x 4 streams, {args.rounds} alternating rounds"
    )
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print()
    print(
        "| windows | identities (forms) | bytes | before µs | ours µs | ratio | refused before / ours | seal µs |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for kind in ("clean", "spanning"):
        windows = _windows(args.subjects, kind == "spanning")
        anon = _anonymizer(windows)
        before = ScanBefore(_identities(windows))
        data = [encode(anon.window(w).payload) for w in windows]
        refused = [0, 0]
        for d in data:
            for side, scan in enumerate((before.check, anon.check_cbor)):
                try:
                    scan(d)
                except AnonymizationError:
                    refused[side] += 1
        base: list[float] = []
        ours: list[float] = []
        for _ in range(args.rounds):
            base.append(_per_record_us(before.check, data, args.repeat))
            ours.append(_per_record_us(anon.check_cbor, data, args.repeat))
        seals = max(1, args.repeat // 5)
        start = time.perf_counter()
        for _ in range(seals):
            for w in windows:
                anon.seal(functools.partial(anon.window, w), encode)
        seal_us = (time.perf_counter() - start) / (seals * len(windows)) * 1e6
        b, o = statistics.median(base), statistics.median(ours)
        n_forms = len(before.forms) + len(before.folded)
        size = statistics.median(len(d) for d in data)
        print(
            f"| {kind} | {len(_identities(windows))} ({n_forms}) | {size:.0f} | {b:.1f} | {o:.1f} | {o / b:.2f}x "
            f"| {refused[0]} / {refused[1]} of {len(data)} | {seal_us:.0f} |"
        )
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
