"""Staged rollouts to a group: two real ``edgetwin run`` gateways on the TLS mosquitto, the twin's CLI.

The revisions are signed once for the group (the member list in the signed metadata); ``twin
rollout`` sends one to a canary first and to the rest only when the canary reports it applied and
healthy.  A revision that breaks a source is rolled back on the canary: the rollout halts, names the
gateway and the reason, and the others never receive it.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from bundle_support import LOOSE_HEALTH, PUMP, PUMP_SITE, card_for, onnx_model
from downlink_support import BROKEN_SOURCE, ROOT, SHORT_DEADLINE_S, Site, applied, new_site, source
from test_downlink_models import sign
from uplink_support import mosquitto_pki, running_broker

from gateway.cli import main
from gateway.downlink.twin_link import fetch_retained
from gateway.records.topics import DEFAULT_PREFIX
from gateway.uplink.certs import DemoPKI

pytestmark = pytest.mark.slow


class FleetSite(Site):
    """A gateway whose config names its files relative to its directory, so one revision fits every member."""

    def text(self, sources: str, **kw: object) -> str:
        return super().text(sources, **kw).replace(f"{self.tmp}/", "")  # type: ignore[arg-type]

    def unit(self, name: str) -> str:
        with contextlib.chdir(self.tmp):  # its state directory is named relative to it
            return super().unit(name)

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("NOTIFY_SOCKET", None)
        env.pop("RUNTIME_DIRECTORY", None)
        with (self.tmp / "gateway.log").open("a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "run", "--config", str(self.config)],
                cwd=self.tmp,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=log,
                text=True,
            )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DemoPKI:
    return mosquitto_pki(tmp_path_factory)


@pytest.fixture
def fleet(tmp_path: Path, pki: DemoPKI) -> Iterator[list[FleetSite]]:
    for broker in running_broker(tmp_path, pki):
        sites: list[FleetSite] = []
        for name in ("a", "b"):  # a canary and the rest (one more adds ~8 s, nothing new)
            (tmp_path / name).mkdir()
            plain = new_site(tmp_path / name, pki, broker)  # the pseudonym from its own site key
            sites.append(FleetSite(plain.tmp, pki, broker, plain.config, plain.key, plain.gateway))
        first = sites[0]
        for s in sites:  # one twin key, trusted by all
            s.key = first.key
            (s.tmp / "trust.json").write_bytes((first.tmp / "trust.json").read_bytes())
            s.config.write_text(s.text(source("bed7-sim")))
        try:
            yield sites
        finally:
            for s in sites:
                s.stop()


def _rollout(
    sites: list[FleetSite], envelope: Path, capsys: pytest.CaptureFixture[str], *extra: str
) -> tuple[int, str]:
    s, p = sites[0], sites[0].pki
    cli = ["twin", "rollout", "--envelope", str(envelope), "--group", str(s.tmp.parent / "ward7.txt")]
    cli += ["--canary", s.gateway, "--deadline", "60", "--broker", f"{s.broker.host}:{s.broker.port}"]
    cli += ["--ca", str(p.ca_file), "--cert", str(p.twin.cert), "--key", str(p.twin.key)]
    capsys.readouterr()
    code = main([*cli, *extra])
    return code, capsys.readouterr().out


def _sign(sites: list[FleetSite], version: int, sources: str, **kw: float) -> Path:
    s = sites[0]
    (s.tmp.parent / f"v{version}.toml").write_text(s.text(sources, **kw))
    out = s.tmp.parent / f"v{version}.envelope"
    cli = ["twin", "sign-config", "--config", str(s.tmp.parent / f"v{version}.toml")]
    cli += ["--key", str(s.tmp / "twin.key"), "--version", str(version)]
    assert main([*cli, "--group", str(s.tmp.parent / "ward7.txt"), "--out", str(out)]) == 0
    return out


def test_a_group_rollout_goes_canary_first_and_halts_on_a_rollback_before_the_rest(
    fleet: list[FleetSite], capsys: pytest.CaptureFixture[str]
) -> None:
    canary, *rest = fleet
    (canary.tmp.parent / "ward7.txt").write_text("# ward 7\n" + "".join(f"{s.gateway}\n" for s in fleet))
    for s in fleet:
        s.start()
    for s in fleet:
        s.reported(lambda r: r.get("phase") == "running", "running")

    good = _sign(fleet, 2, source("bed7-sim") + source("bed12-sim", device="A4:C1:38:00:00:12"))
    code, out = _rollout(fleet, good, capsys, "--settle", "1")
    assert code == 0, out
    assert "all done: watching 1 s more" in out
    assert out.index(f"canary done: {canary.gateway}") < out.index(f"rest: publishing to {rest[0].gateway}")
    for s in fleet:
        rep = s.reported(applied(2), "v2 applied")
        assert rep["units"][s.unit("bed12-sim")] == "running"

    bad = _sign(fleet, 3, BROKEN_SOURCE, deadline_s=SHORT_DEADLINE_S)
    # The operator on the canary's site names its sources with the site's legend.
    legend = canary.tmp / "legend.json"
    capsys.readouterr()
    with contextlib.chdir(canary.tmp):
        assert main(["legend", "--config", str(canary.config), "--json"]) == 0
    legend.write_text(capsys.readouterr().out)
    code, out = _rollout(fleet, bad, capsys, "--legend", str(legend))
    assert code == 1, out
    assert f"HALTED at canary {canary.gateway}: v3 rolled back: unhealthy (source:bed7-sim)" in out
    assert f"not sent to {', '.join(s.gateway for s in rest)}" in out
    rep = canary.reported(lambda r: r["phase"] == "running", "running again")
    assert (rep["applied"]["version"], rep["last_rollback"]["version"]) == (2, 3)
    for s in rest:  # never received v3: their retained desired state is still v2
        retained = fetch_retained(s.twin, f"{DEFAULT_PREFIX}/{s.gateway}/desired")
        assert retained is not None
        assert json.loads(retained)["signed"]["version"] == 2
        rep = s.reported(applied(2), "still v2")
        assert rep["last_rollback"] is None
        assert [e["event"] for e in s.events()].count("received") == 1
    # Sent again, the same revision stops before anything is published: the canary holds v3 as accepted.
    code, out = _rollout(fleet, bad, capsys)
    assert code == 1
    assert f"{canary.gateway} already accepted revision 3" in out
    # A revision of a group the other gateway is not in, put on its topic anyway: refused, its
    # counter untouched (the canary's v3 does not raise it either).
    (canary.tmp.parent / "ward7.txt").write_text(f"{canary.gateway}\n")
    rest[0].publish(_sign(fleet, 4, source("bed7-sim")).read_bytes())
    rep = rest[0].reported(lambda r: bool(r["refused"]), "the outsider's refusal")
    assert (rep["refused"][-1]["reason"], rep["accepted"], rep["applied"]["version"]) == (
        "not-in-group",
        2,
        2,
    )


def _sign_model(sites: list[FleetSite], version: int, model: bytes) -> tuple[Path, Path]:
    # The shipped model flags a few windows itself: agreement is not what is tested here.
    rules = {"windows": 5, "max_latency_us": 1e9, "min_agreement": 0.0}
    group = sites[0].tmp.parent / "ward7.txt"
    return sign(sites[0], model, card_for(model, health=LOOSE_HEALTH), version, rules, group=group)


def _pump(rep: dict[str, object]) -> dict[str, object]:
    models = rep.get("models") or {}
    assert isinstance(models, dict)
    return dict(models.get(PUMP) or {})


def _pump_fleet(fleet: list[FleetSite], extra: str = "") -> list[FleetSite]:
    """Every gateway of the group file runs a pump scored by the shipped model; the fleet."""
    (fleet[0].tmp.parent / "ward7.txt").write_text("".join(f"{s.gateway}\n" for s in fleet))
    for s in fleet:
        s.config.write_text(s.text(PUMP_SITE + extra))
        s.start()
    for s in fleet:
        s.reported(lambda r: _pump(r).get("active") == 0, "the pump model serving")
    return fleet


@pytest.mark.campaign
def test_a_model_rollout_is_promoted_on_the_canary_first_and_halts_when_it_rejects_one(
    fleet: list[FleetSite], capsys: pytest.CaptureFixture[str]
) -> None:
    canary, *rest = _pump_fleet(fleet)

    envelope, model = _sign_model(fleet, 2, onnx_model(pad_bytes=7000))
    code, out = _rollout(fleet, envelope, capsys, "--model", str(model), "--deadline", "120")
    assert code == 0, out
    assert out.index(f"canary done: {canary.gateway}") < out.index(f"rest: publishing to {rest[0].gateway}")
    for s in fleet:
        s.reported(lambda r: _pump(r).get("active") == 2, "v2 serving")

    envelope, model = _sign_model(fleet, 3, onnx_model(constant=0.99))  # an alarm on every window
    code, out = _rollout(fleet, envelope, capsys, "--model", str(model), "--deadline", "120")
    assert code == 1, out
    assert f"HALTED at canary {canary.gateway}: model {PUMP} v3 rejected: alarm-rate" in out
    for s in rest:
        retained = fetch_retained(s.twin, f"{DEFAULT_PREFIX}/{s.gateway}/model")
        assert retained is not None
        assert json.loads(retained)["signed"]["version"] == 2
        last = _pump(s.reported(lambda r: _pump(r).get("active") == 2, "v2 serving"))["last"]
        assert isinstance(last, dict)
        assert (last["version"], last["outcome"]) == (2, "promoted")  # v3 never came


@pytest.mark.campaign
def test_a_model_rolled_back_on_the_canary_while_the_rollout_settles_halts_it(
    fleet: list[FleetSite], capsys: pytest.CaptureFixture[str]
) -> None:
    # The pump's valve fails 60 s after the start: inputs far out, where the new model turns NaN.
    fault = '\n[[sources.events]]\nkind = "valve_fault"\nat_s = 60.0\nduration_s = 60.0\n'
    canary, *rest = _pump_fleet(fleet, fault)
    envelope, model = _sign_model(fleet, 2, onnx_model(nan_above=25.0))  # finite on normal windows
    extra = ["--model", str(model), "--deadline", "120", "--settle", "150"]
    code, out = _rollout(fleet, envelope, capsys, *extra)
    assert code == 1, out
    assert out.index("all done: watching 150 s more") < out.index("HALTED")
    assert f"HALTED at canary {canary.gateway}: model {PUMP} v2 rolled-back: non-finite-output" in out
    for s in rest:
        assert fetch_retained(s.twin, f"{DEFAULT_PREFIX}/{s.gateway}/model", wait_s=1.0) is None
        assert _pump(s.reported(lambda r: True, "reported"))["active"] == 0
