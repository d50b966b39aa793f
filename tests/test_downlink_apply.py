"""Rolling back a revision the gateway exited on before probation could judge it."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from drivers import REGISTRY
from gateway.cli import main
from gateway.config import load
from gateway.downlink import audit, restart
from gateway.downlink import state as persist
from gateway.downlink.checks import trust_findings
from gateway.downlink.diff import Plan
from gateway.downlink.signing import MAX_ENVELOPE_BYTES, Trust, excerpt, key_id, public_hex, sign
from gateway.downlink.unit import Downlink, roll_back, roll_back_after_exit
from gateway.errors import ConfigError
from gateway.observe.check import Level
from gateway.observe.lock import state_dir_lock
from gateway.uplink.config import MqttSection


def _config(tmp: Path, name: str) -> str:
    return f'[gateway]\nname = "{name}"\nstate_dir = "{tmp / "state"}"\n[downlink]\ntrust_file = "{tmp / "t.json"}"\n'


def test_an_exit_on_a_pending_revision_restores_the_previous_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    live = tmp_path / "edgetwin.toml"
    live.write_text(_config(tmp_path, "new"))
    directory = tmp_path / "state" / "downlink"
    directory.mkdir(parents=True)
    backup = directory / "previous.toml"
    backup.write_text(_config(tmp_path, "old"))
    st = persist.DownlinkState(accepted=4, pending=persist.Pending(4, "ab" * 32, str(backup), []))
    persist.save(directory / "state.json", st)
    config = load(live, REGISTRY)

    assert roll_back_after_exit(config, 78) is True
    assert live.read_text() == backup.read_text()
    after = persist.load(directory / "state.json")
    assert after.pending is None
    assert after.accepted == 4  # never taken again
    assert after.refused[-1]["reason"] == "rolled-back"
    assert "exited with code 78" in after.refused[-1]["detail"]
    entries = [json.loads(line) for line in (directory / "audit.jsonl").read_text().splitlines()]
    assert [(e["event"], e["version"]) for e in entries] == [("rolled-back", 4)]
    assert audit.verify(directory / "audit.jsonl").count == 1
    # What people on site see, without a running gateway.
    capsys.readouterr()
    assert main(["downlink", "status", "--config", str(live)]) == 0
    out = capsys.readouterr().out
    assert "running config: the local file (no revision applied)" in out
    assert "last rollback: revision 4 at " in out
    assert "v4 rolled-back: the gateway exited with code 78 on it before it could be judged" in out
    assert f"audit log: 1 entries, chain intact, head {audit.verify(directory / 'audit.jsonl').hash}" in out
    # Nothing pending: an ordinary failure leaves the file alone.
    assert roll_back_after_exit(config, 1) is False
    assert live.read_text() == backup.read_text()


def test_check_reports_the_trust_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    live = tmp_path / "edgetwin.toml"
    live.write_text(_config(tmp_path, "gw") + '[uplink]\nkind = "local"\n')
    assert main(["check", "--config", str(live), "--quiet"]) == 78
    assert 'the downlink rides on the MQTT uplink: set uplink.kind = "mqtt"' in capsys.readouterr().out
    config = load(live, REGISTRY)
    (tmp_path / "t.json").write_text("{}")
    mqtt = replace(
        config,
        core=config.core.model_copy(
            update={"uplink": config.core.uplink.model_copy(update={"kind": "mqtt"})}
        ),
    )
    assert "write it with 'edgetwin twin keygen --trust FILE'" in trust_findings(mqtt)[0].fix
    key = Ed25519PrivateKey.generate().public_key()
    (tmp_path / "t.json").write_text(json.dumps({"keys": {key_id(key): public_hex(key)}, "threshold": 1}))
    found = trust_findings(mqtt)
    assert (found[0].level, found[0].message) == (
        Level.PASS,
        f"trust file {tmp_path / 't.json'}: 1 key(s), threshold 1, 0 revoked",
    )


def test_check_takes_the_downlink_on_the_azure_profile(tmp_path: Path) -> None:
    live = tmp_path / "edgetwin.toml"
    live.write_text(_config(tmp_path, "gw"))
    config = load(live, REGISTRY)
    mqtt = MqttSection.model_validate(
        {"host": "hub1.azure-devices.net", "profile": "azure", "protocol": "3.1.1", "azure_hub": "hub1"}
    )
    uplink = config.core.uplink.model_copy(update={"kind": "mqtt", "mqtt": mqtt})
    azure = replace(config, core=config.core.model_copy(update={"uplink": uplink}))
    key = Ed25519PrivateKey.generate().public_key()
    (tmp_path / "t.json").write_text(json.dumps({"keys": {key_id(key): public_hex(key)}}))
    found = trust_findings(azure)  # the device twin carries it (gateway.downlink.azure)
    assert found[0].level is Level.PASS, found[0].message


def test_an_unreadable_state_file_keeps_the_downlink_off_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    for text in ("{not json", '{"accepted": 3, "unknown": 1}', "[]"):
        path.write_text(text)
        with pytest.raises(ConfigError, match=r"downlink state .*state.json: unreadable .*restore the file"):
            persist.load(path)


def test_a_second_run_refused_for_a_busy_state_dir_does_not_roll_back(tmp_path: Path) -> None:
    live = tmp_path / "edgetwin.toml"
    live.write_text(_config(tmp_path, "new"))
    directory = tmp_path / "state" / "downlink"
    directory.mkdir(parents=True)
    backup = directory / "previous.toml"
    backup.write_text(_config(tmp_path, "old"))
    persist.save(
        directory / "state.json",
        persist.DownlinkState(accepted=4, pending=persist.Pending(4, "ab" * 32, str(backup), [])),
    )
    config = load(live, REGISTRY)
    with state_dir_lock(tmp_path / "state"):  # the running gateway on probation holds it
        assert roll_back_after_exit(config, 1) is False
    assert live.read_text() == _config(tmp_path, "new")
    assert persist.load(directory / "state.json").pending is not None


def test_a_rollback_without_its_backup_is_refused_and_the_live_file_kept(tmp_path: Path) -> None:
    live = tmp_path / "edgetwin.toml"
    live.write_text(_config(tmp_path, "new"))
    directory = tmp_path / "state" / "downlink"
    directory.mkdir(parents=True)
    backup = directory / "previous.toml"
    for present in (False, True):  # missing, then empty
        if present:
            backup.write_text("")
        st = persist.DownlinkState(accepted=4, pending=persist.Pending(4, "ab" * 32, str(backup), []))
        log = audit.AuditLog(directory / "audit.jsonl")
        why = "empty" if present else "No such file or directory"
        with pytest.raises(
            ConfigError, match=f"cannot roll back config v4: the previous config file .* is {why}"
        ):
            roll_back(live, directory, st, log, "test", cause="exited")
        assert live.read_text() == _config(tmp_path, "new")
        assert st.pending is not None
    persist.save(directory / "state.json", st)
    # After an exit: the error is logged, the exit code stands, nothing is written.
    assert roll_back_after_exit(load(live, REGISTRY), 78) is False
    assert live.read_text() == _config(tmp_path, "new")
    assert persist.load(directory / "state.json").pending is not None


def _downlink(tmp: Path, key: Ed25519PrivateKey) -> Downlink:
    live = tmp / "edgetwin.toml"
    live.write_text(_config(tmp, "gw"))
    dl = Downlink(load(live, REGISTRY), REGISTRY, supervisor=None, uplink=None, gateway_id="gw1")  # type: ignore[arg-type]
    dl.quarantine.mkdir(parents=True)
    dl.audit = audit.AuditLog(dl.dir / "audit.jsonl")
    dl._trust = Trust.from_json({"keys": {key_id(key.public_key()): public_hex(key.public_key())}}, "test")
    return dl


def test_an_oversized_payload_is_refused_without_being_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dl = _downlink(tmp_path, Ed25519PrivateKey.generate())
    written: list[Path] = []
    real = persist.write_atomic

    def recorded(path: Path, data: bytes, mode: int = 0o600) -> None:
        written.append(path)
        real(path, data, mode)

    monkeypatch.setattr(persist, "write_atomic", recorded)
    assert asyncio.run(dl._handle(b"x" * (MAX_ENVELOPE_BYTES + 1))) is False
    assert dl.state.refused[-1]["reason"] == "too-large"
    assert not any(p.parent == dl.quarantine for p in written)
    assert list(dl.quarantine.iterdir()) == []


def test_refusal_details_do_not_echo_the_payload_and_repeats_are_recorded_once(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    dl = _downlink(tmp_path, key)
    env = json.loads(
        sign(b"x", keys=[key], gateway="gw1", version=2, expires=dt.datetime(2099, 1, 1, tzinfo=dt.UTC))
    )

    def garbage(n: int) -> bytes:
        env["signed"]["expires"] = f"/dev/serial/by-id/usb-ATTACKER-{n}\n<script>"
        return json.dumps(env).encode()

    for n in range(5):
        assert asyncio.run(dl._handle(garbage(n))) is False
    entries = [json.loads(line) for line in (dl.dir / "audit.jsonl").read_text().splitlines()]
    assert [e["event"] for e in entries] == ["received", "refused"]  # the four repeats not recorded
    assert entries[-1]["detail"] == "not a signed envelope (ValueError)"
    assert len(dl.state.refused) == 1
    saved = (dl.dir / "state.json").read_text() + (dl.dir / "audit.jsonl").read_text()
    assert "ATTACKER" not in saved
    assert "script" not in saved
    # Bounded: one in so many is recorded again, with the count.
    for n in range(5, 5 + 100):
        asyncio.run(dl._handle(garbage(n)))
    assert len(dl.state.refused) == 2
    assert "refused the same way 100 time(s) since the last record" in dl.state.refused[-1]["detail"]


def test_an_unverified_value_is_quoted_as_a_short_sanitized_excerpt() -> None:
    assert excerpt("abc") == "'abc'"
    assert excerpt("a\nb<c>" + "z" * 40) == "'a?b?c?" + "z" * 18 + "'..."


def test_a_pending_revision_saved_before_unit_restarts_existed_loads_as_a_process_restart(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.json"
    path.write_text(
        json.dumps({"accepted": 3, "pending": {"version": 3, "sha256": "ab", "backup": "b", "excused": []}})
    )
    pending = persist.load(path).pending
    assert pending is not None
    assert (pending.applied_by, pending.restarted, pending.starts) == ("process", [], 0)
    pending.applied_by, pending.restarted = "units", ["source:bed9"]
    persist.save(path, persist.DownlinkState(accepted=3, pending=pending))
    again = persist.load(path).pending
    assert again is not None
    assert (again.applied_by, again.restarted) == ("units", ["source:bed9"])


class _Sup:
    """The supervisor as the downlink's rollback sees it."""

    def __init__(self, stopping: bool) -> None:
        self.stopping = stopping
        self.stops = 0
        self.units: tuple[object, ...] = ()

    def request_stop(self) -> None:
        self.stops += 1


class _Sources:
    def __init__(self, error: Exception | None) -> None:
        self.error = error
        self.applied: list[Plan] = []

    async def apply(self, todo: Plan, new: object) -> list[str]:
        self.applied.append(todo)
        if self.error is not None:
            raise self.error
        return todo.units


def _on_probation_in_place(
    tmp: Path, stopping: bool, error: Exception | None
) -> tuple[Downlink, _Sup, _Sources]:
    """A revision that added source bed8 in place, on probation, its previous file backed up."""
    live = tmp / "edgetwin.toml"
    live.write_text(_config(tmp, "new"))
    sup, sources = _Sup(stopping), _Sources(error)
    dl = Downlink(load(live, REGISTRY), REGISTRY, supervisor=sup, uplink=None, gateway_id="gw1")  # type: ignore[arg-type]
    dl.dir.mkdir(parents=True)
    backup = dl.dir / "previous.toml"
    backup.write_text(_config(tmp, "old"))
    dl.audit = audit.AuditLog(dl.dir / "audit.jsonl")
    dl.state = persist.DownlinkState(
        accepted=5, pending=persist.Pending(5, "ab" * 32, str(backup), [], 1, "units", ["source:bed8"])
    )
    dl.sources = sources
    dl._undo = (Plan(added=("bed8",)), load(live, REGISTRY))
    return dl, sup, sources


def test_an_in_place_rollback_that_fails_restarts_the_process_on_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(restart, "_requested", [])  # this process itself is not restarted after the test
    dl, sup, sources = _on_probation_in_place(tmp_path, stopping=False, error=RuntimeError("driver broke"))
    assert dl.state.pending is not None
    asyncio.run(dl._rollback(dl.state.pending, "bed8 failing", "unhealthy", ["source:bed8"]))
    assert sources.applied == [Plan(removed=("bed8",))]  # the reversal was tried, and failed
    assert restart.requested() == "rollback of config v5"
    assert sup.stops == 1
    assert (tmp_path / "edgetwin.toml").read_text() == _config(tmp_path, "old")
    assert dl.phase == "rolling back"


def test_a_stop_during_probation_in_place_leaves_the_revision_to_the_next_start(tmp_path: Path) -> None:
    dl, sup, sources = _on_probation_in_place(tmp_path, stopping=True, error=None)
    pending = dl.state.pending
    assert pending is not None
    asyncio.run(dl._rollback(pending, "sources STOPPED", "unhealthy", ["source:bed8"]))
    assert sources.applied == []  # no old source started during the drain
    assert sup.stops == 0
    assert dl.state.pending is pending
    assert (tmp_path / "edgetwin.toml").read_text() == _config(tmp_path, "new")
