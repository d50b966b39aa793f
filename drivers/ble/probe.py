"""``edgetwin check --online`` for a BLE source: BlueZ answers on the system bus and has the adapter.

Asks BlueZ over D-Bus (as bleak does), not sysfs: the adapter must be known to bluetoothd and
powered, which is what the driver needs.  Each result is ``(level, message, fix)``.
"""

from __future__ import annotations

import asyncio

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.errors import DBusError

from drivers.ble.config import BleConfig

Finding = tuple[str, str, str]

TIMEOUT_S = 5.0


def probe(name: str, cfg: BleConfig) -> list[Finding]:
    """The findings for one BLE source."""
    return asyncio.run(asyncio.wait_for(_probe(name, cfg), TIMEOUT_S * 2))


async def _probe(name: str, cfg: BleConfig) -> list[Finding]:
    where = f"source {name}: adapter {cfg.adapter}"
    try:
        bus = await asyncio.wait_for(MessageBus(bus_type=BusType.SYSTEM).connect(), TIMEOUT_S)
    except (OSError, TimeoutError, DBusError, ValueError) as exc:
        return [
            (
                "fail",
                f"{where}: cannot reach the system D-Bus: {exc}",
                "check that dbus runs (systemctl status dbus) and that the gateway may use it",
            )
        ]
    try:
        reply = await asyncio.wait_for(
            bus.call(
                Message(
                    destination="org.bluez",
                    path=f"/org/bluez/{cfg.adapter}",
                    interface="org.freedesktop.DBus.Properties",
                    member="Get",
                    signature="ss",
                    body=["org.bluez.Adapter1", "Powered"],
                )
            ),
            TIMEOUT_S,
        )
    except TimeoutError:
        return [
            ("fail", f"{where}: BlueZ does not answer", "restart bluetoothd (systemctl restart bluetooth)")
        ]
    finally:
        bus.disconnect()
    if reply is None or reply.message_type == MessageType.ERROR:
        error = reply.error_name if reply is not None else ""
        if error == "org.freedesktop.DBus.Error.ServiceUnknown":
            return [
                (
                    "fail",
                    f"{where}: BlueZ is not running",
                    "install and start bluez (systemctl start bluetooth)",
                )
            ]
        return [
            (
                "fail",
                f"{where}: BlueZ has no such adapter",
                "plug the adapter in and check 'bluetoothctl list', or correct adapter in the config",
            )
        ]
    powered = reply.body[0].value if reply.body and isinstance(reply.body[0], Variant) else None
    if powered is False:
        return [
            (
                "warn",
                f"{where}: present but powered off",
                f"bluetoothctl select {cfg.adapter}; bluetoothctl power on",
            )
        ]
    return [("pass", f"{where}: present and powered (BlueZ)", "")]
