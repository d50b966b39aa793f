"""BLE connection policy without a radio: backoff, slot budget, error classes, watchdog, config."""

from __future__ import annotations

import asyncio
import random
import re
import time
import tomllib
from pathlib import Path

import pytest
from pydantic import ValidationError

pytest.importorskip("bleak")

from bleak.exc import BleakDBusError, BleakDeviceNotFoundError
from bleak_retry_connector import BleakConnectionError, BleakNotFoundError

from drivers.ble.config import BleConfig
from drivers.ble.driver import factory
from drivers.ble.manager import DeviceState, ManagedDevice, ScanWatchdog, SlotBudget, classify
from drivers.ble.protocol import PROFILES
from gateway.backoff import Backoff
from gateway.config import COMMON_SOURCE_KEYS
from gateway.contracts import SourceInfo


def test_backoff_grows_capped_with_jitter() -> None:
    b = Backoff(1.0, 8.0, random.Random(1))
    delays = [b.next() for _ in range(8)]
    nominal = [1, 2, 4, 8, 8, 8, 8, 8]
    for d, n in zip(delays, nominal, strict=True):
        assert n / 2 <= d <= n
    assert len(set(delays)) == len(delays)  # jittered, not in step
    b.reset()
    assert b.next() <= 1.0


def test_slot_budget_serves_waiters_in_order() -> None:
    async def scenario() -> list[str]:
        slots = SlotBudget(2)
        assert slots.try_acquire("a")
        assert slots.try_acquire("b")
        assert not slots.try_acquire("c")
        order: list[str] = []

        async def wait(addr: str) -> None:
            await slots.acquire(addr)
            order.append(addr)

        tc = asyncio.create_task(wait("c"), name="c")
        td = asyncio.create_task(wait("d"), name="d")
        await asyncio.sleep(0)
        assert list(slots.waiting) == ["c", "d"]
        assert not slots.try_acquire("e")  # nobody jumps the queue
        slots.release("a")
        await asyncio.sleep(0)
        assert order == ["c"]
        assert slots.used == 2
        td.cancel()
        await asyncio.gather(td, return_exceptions=True)
        slots.release("b")
        assert slots.holders == {"c"}
        assert not slots.waiting
        await tc
        return order

    assert asyncio.run(scenario()) == ["c"]


def test_slot_handed_over_to_a_cancelled_waiter_is_given_back() -> None:
    async def scenario() -> SlotBudget:
        slots = SlotBudget(1)
        slots.try_acquire("a")
        t = asyncio.create_task(slots.acquire("b"), name="b")
        await asyncio.sleep(0)
        slots.release("a")  # hands the slot to b ...
        t.cancel()  # ... which is cancelled before it runs
        await asyncio.gather(t, return_exceptions=True)
        return slots

    slots = asyncio.run(scenario())
    assert slots.used == 0


def _wrapped(inner: BaseException) -> BaseException:
    # What establish_connection(max_attempts=1) raises: its own error, BlueZ's as the cause.
    try:
        try:
            raise inner
        except BaseException as exc:
            raise BleakConnectionError("hr - AA: Failed to connect after 1 attempt(s)") from exc
    except BleakConnectionError as outer:
        return outer


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (BleakDBusError("org.bluez.Error.InProgress", ["In Progress"]), "in_progress"),
        (BleakDBusError("org.bluez.Error.Failed", ["Software caused connection abort"]), "failed"),
        (BleakDBusError("org.freedesktop.DBus.Error.ServiceUnknown", ["no bluez"]), "adapter"),
        (BleakDBusError("org.bluez.Error.NotReady", ["Resource Not Ready"]), "adapter"),
        (BleakDeviceNotFoundError("AA", "gone"), "not_found"),
        (BleakNotFoundError("gone"), "not_found"),
        (TimeoutError(), "timeout"),
        (EOFError(), "adapter"),
    ],
)
def test_errors_are_classified_through_the_wrapping(exc: BaseException, kind: str) -> None:
    assert classify(exc) == kind
    assert classify(_wrapped(exc)) == kind


def test_scan_watchdog() -> None:
    w = ScanWatchdog(5.0)
    w.heard(100.0)
    assert not w.due(104.0, looking=True)
    assert w.due(105.0, looking=True)
    assert not w.due(200.0, looking=False)  # nobody to look for: a quiet scan is fine
    w.restarted(105.0)
    assert (w.restarts, w.due(106.0, looking=True)) == (1, False)


def test_lost_cause() -> None:
    dev = ManagedDevice("AA:BB:CC:DD:EE:FF", PROFILES["hr"], "bed1")
    dev.down_since = 10.0
    assert dev.lost_cause() == "out_of_range"  # never heard since it went
    dev.heard_at = 11.0
    dev.last_error = "failed"
    assert dev.lost_cause() == "connect_failed"
    dev.last_error = "timeout"
    assert dev.lost_cause() == "out_of_range"
    dev.last_error = "wrong_service"
    assert dev.lost_cause() == "wrong_service"
    dev.last_error = None
    dev.state = DeviceState.WAITING_SLOT
    assert dev.lost_cause() == "waiting_slot"  # it never tried: not connect_failed


def test_slot_turns_go_to_the_longest_holder_once_the_first_waiter_waited_long_enough() -> None:
    async def scenario() -> None:
        slots = SlotBudget(2)
        assert slots.try_acquire("a")
        assert slots.try_acquire("b")
        slots.held_since.update(a=100.0, b=90.0)  # b has held its slot longest
        t = time.monotonic()
        waiter = asyncio.create_task(slots.acquire("c"), name="c")
        await asyncio.sleep(0)
        assert slots.turn_due(t + 5, 30.0) == []  # c has not waited long enough
        assert slots.turn_due(t + 31, 30.0) == ["b", "a"]
        slots.held_since["a"] = t + 10
        assert slots.turn_due(t + 31, 30.0) == ["b"]  # a has not held its slot long enough
        slots.release("b")
        await waiter
        assert slots.holders == {"a", "c"}
        assert slots.turn_due(t + 100, 30.0) == []  # nobody waits

    asyncio.run(scenario())


def test_config_allowlist_rules() -> None:
    cfg = BleConfig.model_validate(
        {"devices": [{"address": "c0:ff:ee:00:00:01", "profile": "hr", "subject": "ward3-bed12"}]}
    )
    assert cfg.devices[0].address == "C0:FF:EE:00:00:01"
    assert (cfg.adapter, cfg.slots, cfg.max_connect_attempts) == ("hci0", 5, 3)
    with pytest.raises(ValidationError, match="listed twice"):
        BleConfig.model_validate(
            {
                "devices": [
                    {"address": "C0:FF:EE:00:00:01", "profile": "hr"},
                    {"address": "c0:ff:ee:00:00:01", "profile": "bp"},
                ]
            }
        )
    with pytest.raises(ValidationError):
        BleConfig.model_validate(
            {"devices": [{"address": "HRM-Strap", "profile": "hr"}]}
        )  # a name is no address
    with pytest.raises(ValidationError):
        BleConfig.model_validate({"devices": [{"address": "C0:FF:EE:00:00:01", "profile": "ecg"}]})
    with pytest.raises(ValidationError):
        BleConfig.model_validate({"devices": []})
    with pytest.raises(ValidationError):
        BleConfig.model_validate({"devices": [{"address": "C0:FF:EE:00:00:01", "profile": "hr"}], "slots": 0})
    with pytest.raises(ValidationError):
        BleConfig.model_validate(
            {"devices": [{"address": "C0:FF:EE:00:00:01", "profile": "hr"}], "slots": "5"}
        )
    with pytest.raises(ValidationError, match="reconnect_max_s"):
        BleConfig.model_validate(
            {
                "devices": [{"address": "C0:FF:EE:00:00:01", "profile": "hr"}],
                "reconnect_min_s": 9.0,
                "reconnect_max_s": 2.0,
            }
        )


def test_readme_sample_config_builds_a_driver() -> None:
    readme = (Path(__file__).resolve().parents[1] / "drivers" / "ble" / "README.md").read_text(
        encoding="utf-8"
    )
    (block,) = re.findall(r"^```toml[ \t]*\n(.*?)^```", readme, re.MULTILINE | re.DOTALL)
    (table,) = tomllib.loads(block)["sources"]
    assert table["driver"] == "ble"
    cfg = BleConfig.model_validate({k: v for k, v in table.items() if k not in COMMON_SOURCE_KEYS})
    drv = factory(SourceInfo(table["name"], table["subject"], table["kind"]), cfg)
    subjects = {addr: next(iter(s.values())).subject for addr, s in drv.streams.items()}
    assert subjects["C2:00:00:00:00:02"] == "ward3-bed14"
    assert subjects["C2:00:00:00:00:01"] == table["subject"]
    assert {st.state for st in drv.status().values()} == {"scanning"}
