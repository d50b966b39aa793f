"""Sources swapped in place (gateway.downlink.sources): identities known to the anonymizer before anything runs."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from drivers import REGISTRY
from gateway.anonymize import Anonymizer, Pseudonymizer
from gateway.config import load
from gateway.downlink.diff import plan
from gateway.downlink.sources import SourceSwitch
from gateway.errors import AnonymizationError
from gateway.notify import Notifier
from gateway.supervisor import Supervisor, UnitState


def _src(name: str, device: str) -> str:
    return (
        f'\n[[sources]]\nname = "{name}"\ndriver = "sim"\nsubject = "{name}-subject"\nprofile = "patient"\n'
        f'device = "{device}"\n'
    )


class _Sink:
    def put(self, sample: Any) -> None: ...
    def put_block(self, block: Any) -> None: ...
    def alarm(self, alarm: Any) -> None: ...
    def diagnostic(self, diagnostic: Any) -> None: ...


def test_new_identities_are_refused_before_the_new_source_is_built(tmp_path: Path) -> None:
    head = f'[gateway]\nname = "ward7-hub"\nstate_dir = "{tmp_path}"\n'
    (tmp_path / "old.toml").write_text(head + _src("bed7", "A4:C1:38:00:00:07"))
    (tmp_path / "new.toml").write_text(
        head + _src("bed7", "A4:C1:38:00:00:07") + _src("bed5", "A4:C1:38:00:00:55")
    )
    old, new = load(tmp_path / "old.toml", REGISTRY), load(tmp_path / "new.toml", REGISTRY)
    anonymizer = Anonymizer(Pseudonymizer(b"k" * 32), time_mode="relative")
    seen_at_build: list[list[bool]] = []

    def refused(identity: str) -> bool:
        try:
            anonymizer.check(f"x {identity} y".encode())
        except AnonymizationError:
            return True
        return False

    real = REGISTRY["sim"].factory

    def factory(info: Any, config: Any) -> Any:
        seen_at_build.append([refused(i) for i in ("bed5", "bed5-subject", "A4:C1:38:00:00:55")])
        return real(info, config)

    registry = {**REGISTRY, "sim": replace(REGISTRY["sim"], factory=factory)}
    shown: list[list[tuple[str, str]]] = []

    async def main() -> list[str]:
        sup = Supervisor(Notifier(None))
        switch = SourceSwitch(
            registry,
            sup,
            anonymizer,
            _Sink(),
            lambda c: shown.append([(e.info.name, e.driver) for e in c.sources]),
        )
        units = await switch.apply(plan(old, new), new)
        try:
            for _ in range(500):
                if [u.state for u in sup.units] == [UnitState.RUNNING]:
                    break
                await asyncio.sleep(0.01)
            assert [(u.name, u.state) for u in sup.units] == [("source:bed5", UnitState.RUNNING)]
        finally:
            await sup.stop_unit("source:bed5")
        return units

    assert asyncio.run(main()) == ["source:bed5"]
    assert seen_at_build == [[True, True, True]]  # fail-closed: before the driver even exists
    assert shown == [[("bed7", "sim"), ("bed5", "sim")]]


@pytest.mark.parametrize("identity", ["bed7", "bed7-subject"])
def test_a_removed_source_stays_refused(tmp_path: Path, identity: str) -> None:
    head = f'[gateway]\nname = "ward7-hub"\nstate_dir = "{tmp_path}"\n'
    (tmp_path / "old.toml").write_text(head + _src("bed7", "A4:C1:38:00:00:07"))
    (tmp_path / "new.toml").write_text(head + _src("bed9", "A4:C1:38:00:00:09"))
    old, new = load(tmp_path / "old.toml", REGISTRY), load(tmp_path / "new.toml", REGISTRY)
    anonymizer = Anonymizer(
        Pseudonymizer(b"k" * 32), time_mode="relative", local_identities=["bed7", "bed7-subject"]
    )

    async def main() -> None:
        sup = Supervisor(Notifier(None))
        await SourceSwitch(REGISTRY, sup, anonymizer, _Sink(), lambda s: None).apply(plan(old, new), new)
        await sup.stop_unit("source:bed9")

    asyncio.run(main())
    with pytest.raises(AnonymizationError):
        anonymizer.check(f"x {identity} y".encode())
