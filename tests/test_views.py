"""Features that mean something per signal shape, and one way every view shows them.

A 50 Hz phase current and a vibration go through the real pipeline (windows, features,
anonymizer, codec, outbox) and are shown by the twin's view: RMS, peak and dominant frequency,
named, with their units; an RR series shows its mean and RMSSD, labelled.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import numpy as np
import pytest

from drivers import REGISTRY
from gateway.anonymize import Anonymizer, Pseudonymizer
from gateway.config import validate
from gateway.outbox import AsyncOutbox, Outbox
from gateway.pipeline.features import state_features, waveform_features
from gateway.records import FeaturesWindow, SeqMeta, StreamWindow, decode, encode, wrap
from gateway.records.render import describe, number, quantity, stream_text
from gateway.runtime import Pipeline
from gateway.sample import SampleBlock, Stream, industrial_metric
from gateway.twin.decoder import decode_message
from gateway.twin.view import TwinView

AMPLITUDE_A = 14.1  # peak of the simulated phase current: RMS 9.97 A


def test_waveform_features_of_a_50_hz_current() -> None:
    t = np.arange(500) / 500.0
    f = waveform_features(AMPLITUDE_A * np.sin(2 * np.pi * 50.0 * t + 0.3), 500.0)
    assert f["rms"] == pytest.approx(AMPLITUDE_A / math.sqrt(2), rel=1e-3)
    assert f["peak"] == pytest.approx(AMPLITUDE_A, rel=2e-3)
    assert f["crest"] == pytest.approx(math.sqrt(2), rel=3e-3)
    assert f["fdom"] == pytest.approx(50.0, abs=0.2)


def test_dominant_frequency_between_bins_and_without_a_rate() -> None:
    t = np.arange(250) / 250.0
    vib = 0.3 * np.sin(2 * np.pi * 24.6 * t) + 0.06 * np.sin(2 * np.pi * 89.3 * t)
    assert waveform_features(vib, 250.0)["fdom"] == pytest.approx(24.6, abs=0.15)
    assert "fdom" not in waveform_features(vib, None)  # no rate, no frequency
    assert waveform_features(np.zeros(10), 10.0) == {"rms": 0.0, "peak": 0.0}  # no crest of silence
    assert waveform_features(np.array([np.nan]), 1.0) == {}


def test_an_on_change_state_reports_its_last_value_and_changes() -> None:
    assert state_features(np.array([0.0, 0.0, 1.0, 1.0, 0.0, np.nan])) == {"last": 0.0, "changes": 2.0}
    assert state_features(np.array([])) == {}
    valve = StreamWindow("Valve/Open", "1", "d", 6, features={"last": 1.0, "changes": 2.0}, shape="state")
    assert stream_text(valve) == "Open last 1, changes 2"


def test_integers_units_and_labels_print_one_way() -> None:
    assert number(1.0) == "1"  # fw_major=1, not 1.0
    assert number(97.25) == "97.25"
    assert number(1234.5678) == "1235"
    assert quantity(37.2, "Cel") == "37.2 °C"
    assert quantity(120, "mm[Hg]") == "120 mmHg"
    rr = StreamWindow(
        "MDC_ECG_TIME_PD_RR_GL", "ms", "d", 70, features={"mean": 928.0, "rmssd": 27.0, "sdnn": 40.0}
    )
    assert stream_text(rr) == "RR mean 928 ms, RMSSD 27 ms"
    hr = StreamWindow("MDC_ECG_HEART_RATE", "/min", "d", 30, features={"mean": 64.0, "std": 1.5})
    assert stream_text(hr) == "HR mean 64 /min"
    assert stream_text(StreamWindow("MDC_TEMP_BODY", "Cel", "d", 0, gap=True)) == "Temp GAP"


def test_an_rr_stream_keeps_its_labels_from_the_first_window_on() -> None:
    """The same line never changes meaning: mean and RMSSD are both named in every window."""
    view = TwinView()
    first = StreamWindow("MDC_ECG_TIME_PD_RR_GL", "ms", "d", 1, features={"mean": 928.0}, shape="interval")
    later = StreamWindow(
        "MDC_ECG_TIME_PD_RR_GL", "ms", "d", 32, features={"mean": 937.0, "rmssd": 27.0}, shape="interval"
    )
    lines = []
    for seq, s in enumerate((first, later), 1):
        data = wrap(encode(FeaturesWindow("subj", "medical", 10.0 * seq, 30.0, (s,), run=1)), SeqMeta(seq, 1))
        msg = decode_message("edgetwin/v1/gw/features/subj", data)
        assert msg is not None
        view.update(msg)
        lines.append(view.render())
    assert "RR mean 928 ms" in lines[0]
    assert "RR mean 937 ms, RMSSD 27 ms" in lines[1]


def test_a_motor_current_and_a_vibration_show_rms_peak_and_frequency(tmp_path: Path) -> None:
    config = validate(
        {
            "gateway": {"state_dir": str(tmp_path)},
            "pipeline": {"window_s": 1.0, "hop_s": 1.0, "grace_s": 0.0},
        },
        "<test>",
        REGISTRY,
    )
    current = Stream(
        "node", "pump-3", "NODE-1", industrial_metric("motor_current", "A", "waveform"), "industrial", 500.0
    )
    vibration = Stream(
        "node", "pump-3", "NODE-1", industrial_metric("vibration", "g", "waveform"), "industrial", 250.0
    )
    temp = Stream("node", "pump-3", "NODE-1", industrial_metric("winding_temp", "°C"), "industrial", 1.0)

    def block(stream: Stream, t0: float, values: np.ndarray, rate: float) -> SampleBlock:
        t = t0 + np.arange(values.size) / rate
        return SampleBlock(stream, t, t + 1.7e9, values, np.zeros(values.size, np.uint8))

    async def main() -> list[bytes]:
        anon = Anonymizer(Pseudonymizer(b"s" * 32), time_mode="relative", start_wall=1.7e9)
        async with AsyncOutbox(lambda: Outbox(tmp_path / "outbox.db")) as outbox:
            pipeline = Pipeline(config, anon, outbox, models=[])
            t_c = np.arange(1000) / 500.0
            t_v = np.arange(500) / 250.0
            pipeline.sink.put_block(
                block(current, 100.0, AMPLITUDE_A * np.sin(2 * np.pi * 50.0 * t_c), 500.0)
            )
            pipeline.sink.put_block(block(vibration, 100.0, 0.3 * np.sin(2 * np.pi * 24.6 * t_v), 250.0))
            pipeline.sink.put_block(block(temp, 100.0, np.array([61.0, 61.0]), 1.0))
            await pipeline.step(now_mono=102.0, now_wall=1.7e9 + 102.0)
            await outbox.flush()
            return [item.payload for item in await outbox.lease(100) if item.topic.startswith("features/")]

    payloads = asyncio.run(main())
    assert payloads
    view = TwinView()
    for seq, data in enumerate(payloads, 1):
        msg = decode_message(f"edgetwin/v1/gw/features/{decode(data).subject}", wrap(data, SeqMeta(seq, 1)))
        assert msg is not None
        view.update(msg)
    (subject,) = view.gateways["gw"].subjects.values()
    cur = subject.streams["motor_current"]
    assert cur.shape == "waveform"
    assert cur.features["rms"] == pytest.approx(AMPLITUDE_A / math.sqrt(2), rel=0.01)
    assert abs(cur.features["mean"]) < 0.1  # what the old view printed: a motor that looked off
    text = view.render()
    # 500 Hz sampling of 50 Hz catches the crest at 72 degrees at best: peak = 14.1 * sin(72 deg).
    assert "motor_current RMS 9.97 A, peak 13.41 A, f_dom 50 Hz" in text
    assert "vibration RMS 0.212 g, peak 0.3 g, f_dom 24.59 Hz" in text  # UCUM [g] on the wire, g on screen
    assert "winding_temp mean 61 °C" in text  # °C from the device became Cel on the wire and °C again
    assert decode(payloads[-1]).streams[-1].unit == "Cel"  # type: ignore[union-attr]
    assert "FEATURES" in describe(decode(payloads[-1]))
