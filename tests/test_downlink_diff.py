"""The pure diff of two validated configs into the units a revision restarts (gateway.downlink.diff)."""

from __future__ import annotations

from pathlib import Path

import pytest

from drivers import REGISTRY
from gateway.config import Config, load
from gateway.downlink.diff import plan

BASE = """[gateway]
name = "ward7-hub"
state_dir = "{state}"
[downlink]
trust_file = "{state}/trust.json"
apply_deadline_s = 20.0
"""


def _src(name: str, device: str = "A4:C1:38:00:00:07", subject: str | None = None) -> str:
    return (
        f'\n[[sources]]\nname = "{name}"\ndriver = "sim"\nsubject = "{subject or name + "-subject"}"\n'
        f'profile = "patient"\ndevice = "{device}"\n'
    )


def _config(tmp: Path, text: str, name: str = "c.toml") -> Config:
    path = tmp / name
    path.write_text(text.replace("{state}", str(tmp)))
    return load(path, REGISTRY)


@pytest.fixture
def base(tmp_path: Path) -> Config:
    return _config(tmp_path, BASE + _src("bed7") + _src("bed9", "A4:C1:38:00:00:09"), "old.toml")


def test_one_source_changed_added_removed(tmp_path: Path, base: Config) -> None:
    new = _config(tmp_path, BASE + _src("bed7", "A4:C1:38:00:00:08") + _src("bed3"))
    p = plan(base, new)
    assert p.in_place
    assert (p.changed, p.added, p.removed) == (("bed7",), ("bed3",), ("bed9",))
    assert p.units == ["source:bed3", "source:bed7", "source:bed9"]
    back = p.reverse()
    assert (back.added, back.removed, back.changed) == (("bed9",), ("bed3",), ("bed7",))


def test_the_same_config_restarts_nothing(tmp_path: Path, base: Config) -> None:
    p = plan(base, _config(tmp_path, BASE + _src("bed7") + _src("bed9", "A4:C1:38:00:00:09")))
    assert p.in_place
    assert p.units == []


def test_a_disabled_source_counts_as_changed(tmp_path: Path, base: Config) -> None:
    text = BASE + _src("bed7") + _src("bed9", "A4:C1:38:00:00:09") + "enabled = false\n"
    assert plan(base, _config(tmp_path, text)).units == ["source:bed9"]


def test_downlink_timings_are_taken_in_place(tmp_path: Path, base: Config) -> None:
    text = BASE.replace("20.0", "5.0") + "settle_s = 2.0\n" + _src("bed7") + _src("bed9", "A4:C1:38:00:00:09")
    p = plan(base, _config(tmp_path, text))
    assert p.in_place
    assert p.other == ("downlink.apply_deadline_s", "downlink.settle_s")


@pytest.mark.parametrize(
    ("extra", "section"),
    [
        ('[logging]\nlevel = "debug"\n', "logging"),
        ('[privacy]\ntime = "coarse"\n', "privacy"),
        ("[outbox]\nmax_mb = 50\n", "outbox"),
        ("[pipeline]\nhop_s = 2.0\n", "pipeline"),
        ('[uplink]\nkind = "none"\n', "uplink"),
    ],
)
def test_a_process_level_section_restarts_the_process(
    tmp_path: Path, base: Config, extra: str, section: str
) -> None:
    text = BASE + extra + _src("bed7") + _src("bed7b", "A4:C1:38:00:00:0B")
    p = plan(base, _config(tmp_path, text))
    assert not p.in_place
    assert section in p.process


def test_a_trust_file_change_and_a_state_dir_change_restart_the_process(tmp_path: Path, base: Config) -> None:
    other = tmp_path / "other"
    other.mkdir()
    text = (
        BASE.replace('"{state}/trust.json"', f'"{other}/trust.json"')
        + _src("bed7")
        + _src("bed9", "A4:C1:38:00:00:09")
    )
    assert plan(base, _config(tmp_path, text)).process == ("downlink",)
    moved = BASE.replace('state_dir = "{state}"', f'state_dir = "{other}"') + _src("bed7")
    assert "gateway" in plan(base, _config(tmp_path, moved)).process


MQTT = """[uplink]
kind = "mqtt"
[uplink.mqtt]
host = "127.0.0.1"
port = {port}
connect_timeout_s = 2.0
topic_prefix = "{prefix}"
"""


def test_broker_connection_keys_reconnect_the_uplink_other_mqtt_keys_restart_the_process(
    tmp_path: Path,
) -> None:
    def cfg(name: str, port: int = 8883, prefix: str = "edgetwin/v1") -> Config:
        return _config(
            tmp_path,
            BASE + MQTT.replace("{port}", str(port)).replace("{prefix}", prefix) + _src("bed7"),
            name,
        )

    old = cfg("old.toml")
    moved = plan(old, cfg("moved.toml", port=8884))
    assert moved.in_place
    assert moved.uplink
    assert moved.units == ["uplink"]
    assert moved.reverse().uplink
    assert plan(old, cfg("prefix.toml", prefix="plant/v2")).process == ("uplink",)


FUSION = """[[estimators.fusion]]
subject = "bed7-subject"
sources = [{ metric = "MDC_ECG_HEART_RATE" }]
"""


def test_a_source_whose_subject_is_estimated_restarts_the_process(tmp_path: Path) -> None:
    old = _config(tmp_path, BASE + FUSION + _src("bed7") + _src("bed9", "A4:C1:38:00:00:09"), "old.toml")
    other = _config(tmp_path, BASE + FUSION + _src("bed7") + _src("bed9", "A4:C1:38:00:00:19"), "b.toml")
    assert plan(old, other).units == ["source:bed9"]
    new = _config(
        tmp_path, BASE + FUSION + _src("bed7", "A4:C1:38:00:00:08") + _src("bed9", "A4:C1:38:00:00:09")
    )
    assert plan(old, new).process == ("sources[bed7]: its subject or name is in [estimators]",)


def test_limit_alarms_are_retuned_in_place(tmp_path: Path, base: Config) -> None:
    alarms = "[alarms.limits.MDC_PULS_OXIM_SAT_O2]\nlow = 88.0\nlow_low = 80.0\n"
    p = plan(base, _config(tmp_path, BASE + alarms + _src("bed7") + _src("bed9", "A4:C1:38:00:00:09")))
    assert p.in_place
    assert p.units == ["alarms"]
    assert p.reverse().alarms


def test_the_status_section_restarts_the_status_units(tmp_path: Path, base: Config) -> None:
    status = "[status]\nrefresh_s = 0.5\n"
    p = plan(base, _config(tmp_path, BASE + status + _src("bed7") + _src("bed9", "A4:C1:38:00:00:09")))
    assert p.in_place
    assert p.units == ["status"]
    assert p.reverse().status
