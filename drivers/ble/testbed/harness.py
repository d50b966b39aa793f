"""The emulated radio as one object: private bus, emulated BlueZ, simulated wearables, controls.

For tests and the demo. All processes are children started and stopped by PID from plain
(non-async) code; radio controls run on a private thread with its own event loop and D-Bus
connection, so none of this lives on the event loop that runs bleak. From async code call the
controls through ``asyncio.to_thread``. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Coroutine, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from drivers.ble.testbed.bus import PrivateBus, read_line, stop_process
from gateway.errors import TransientError

_LOGGER = logging.getLogger(__name__)
_T = TypeVar("_T")

#: The gateway's emulated adapter (hci0); an address from the documentation range (RFC 7042).
CENTRAL_ADDRESS = "00:00:5E:00:53:00"
ENV = "DBUS_SYSTEM_BUS_ADDRESS"
_ROOT = Path(__file__).resolve().parents[3]
# A child's first line (READY) comes after its interpreter has started and imported: a second of
# CPU that a loaded two-core machine stretched past 20 s of wall time. Commands answer at once.
_START_TIMEOUT_S = 60.0


def _expect_ready(line: str, what: str) -> None:
    if not line.startswith("ready"):
        raise TransientError(f"testbed {what}: unexpected first line {line!r}: see its log")


def device_path(address: str, adapter: str = "hci0") -> str:
    """BlueZ's object path of a remote device on an adapter."""
    return f"/org/bluez/{adapter}/dev_{address.upper().replace(':', '_')}"


class WearableProcess:
    """A simulated wearable running as a child process, driven by its stdin commands."""

    def __init__(self, proc: subprocess.Popen[bytes], address: str, profile: str, timeout_s: float) -> None:
        self.proc = proc
        self.address = address
        self.profile = profile
        self.timeout_s = timeout_s
        self.adapter = ""

    def command(self, line: str, timeout_s: float | None = None) -> str:
        """Send one command and return its answer line; TransientError when none comes in time."""
        if self.proc.poll() is not None or self.proc.stdin is None:
            raise TransientError(f"testbed wearable {self.profile}: not running: start it again")
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        answer = read_line(
            self.proc, timeout_s or self.timeout_s, f"wearable {self.profile} ({line.split(maxsplit=1)[0]})"
        )
        if answer.startswith("error"):
            raise TransientError(f"testbed wearable {self.profile}: {line!r} refused: {answer}")
        return answer

    def power_off(self) -> None:
        """Kill the wearable's process outright, as a pulled battery does."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=self.timeout_s)
        self._close()

    def stop(self) -> None:
        """Stop the wearable cleanly (by PID)."""
        stop_process(self.proc, f"wearable {self.profile}")
        self._close()

    def _close(self) -> None:
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


class Testbed:
    """Private dbus-daemon + emulated BlueZ with the gateway's adapter (hci0) + wearables."""

    __test__ = False  # not a test class, whatever pytest makes of the name

    def __init__(
        self,
        *,
        scan_interval_s: float = 0.1,
        page_timeout_s: float = 0.3,
        export_env: bool = True,
        timeout_s: float = 10.0,
        verbose: bool = False,
    ) -> None:
        self.scan_interval_s = scan_interval_s
        self.page_timeout_s = page_timeout_s
        self.export_env = export_env
        self.timeout_s = timeout_s
        self.verbose = verbose
        self.bus = PrivateBus()
        self.address = ""
        self._emulator: subprocess.Popen[bytes] | None = None
        self._wearables: list[WearableProcess] = []
        self._old_env: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._control: MessageBus | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env[ENV] = self.address
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH", "")) if p)
        return env

    def start(self) -> Testbed:
        """Start the bus, the emulator and the control thread."""
        try:
            self.address = self.bus.start()
            argv = [
                sys.executable,
                "-m",
                "drivers.ble.testbed.emulator",
                "-a",
                CENTRAL_ADDRESS,
                "--scan-interval",
                str(self.scan_interval_s),
                "--page-timeout",
                str(self.page_timeout_s),
            ]
            if self.verbose:
                argv.append("-v")
            self._emulator = subprocess.Popen(  # noqa: S603 - fixed argv
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=self._env(), cwd=_ROOT
            )
            _expect_ready(
                read_line(self._emulator, max(self.timeout_s, _START_TIMEOUT_S), "emulator"), "emulator"
            )
            if self.export_env:
                self._old_env = os.environ.get(ENV)
                os.environ[ENV] = self.address
            self._start_control()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_control(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="testbed-control", daemon=True)
        self._thread.start()
        address = self.address

        async def connect() -> MessageBus:
            return await MessageBus(bus_address=address).connect()

        self._control = self._run(connect())

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(self.timeout_s)

    def stop(self) -> None:
        """Stop wearables, the control thread, the emulator and the bus (each by PID, bounded)."""
        for w in self._wearables:
            w.stop()
        self._wearables.clear()
        if self._control is not None:
            self._control.disconnect()
            self._control = None
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(self.timeout_s)
            self._loop.close()
            self._loop = None
        if self._emulator is not None:
            stop_process(self._emulator, "emulator")
            if self._emulator.stdout is not None:
                self._emulator.stdout.close()
            self._emulator = None
        self.bus.stop()
        if self.export_env:
            if self._old_env is None:
                os.environ.pop(ENV, None)
            else:
                os.environ[ENV] = self._old_env

    def __enter__(self) -> Testbed:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- wearables ---------------------------------------------------------------------------------

    def wearable(
        self,
        profile: str,
        address: str,
        *,
        seed: int = 0,
        rate: float | None = None,
        interval: float | None = None,
        battery: int = 87,
        data: Path | None = None,
        name: str | None = None,
        sensor_off: Sequence[tuple[float, float]] = (),
    ) -> WearableProcess:
        """Start a simulated wearable on its own emulated adapter; returns once it advertises."""
        argv = [
            sys.executable,
            "-m",
            "drivers.ble.testbed.peripheral",
            "--profile",
            profile,
            "--address",
            address,
            "--seed",
            str(seed),
            "--battery",
            str(battery),
            "--exit-on-eof",
        ]
        if rate is not None:
            argv += ["--rate", str(rate)]
        if interval is not None:
            argv += ["--interval", str(interval)]
        if data is not None:
            argv += ["--data", str(data)]
        if name is not None:
            argv += ["--name", name]
        for at, seconds in sensor_off:
            argv += ["--sensor-off", f"{at:g}:{seconds:g}"]
        proc = subprocess.Popen(  # noqa: S603 - fixed argv
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=self._env(), cwd=_ROOT
        )
        w = WearableProcess(proc, address.upper(), profile, self.timeout_s)
        self._wearables.append(w)
        line = read_line(proc, max(self.timeout_s, _START_TIMEOUT_S), f"wearable {profile}")
        _expect_ready(line, f"wearable {profile}")
        w.adapter = line.split()[1]
        return w

    # -- radio controls (blocking; from async code use asyncio.to_thread) --------------------------

    async def _acall(self, path: str, interface: str, member: str, signature: str, body: list[Any]) -> Any:
        assert self._control is not None
        reply = await self._control.call(
            Message(
                destination="org.bluez",
                path=path,
                interface=interface,
                member=member,
                signature=signature,
                body=body,
            )
        )
        assert reply is not None
        if reply.message_type == MessageType.ERROR:
            raise TransientError(f"testbed {interface}.{member}: {reply.error_name}: {reply.body}")
        return reply.body

    def _testbed(self, member: str, signature: str = "", *body: Any) -> Any:
        return self._run(
            self._acall("/org/edgetwin/testbed", "org.edgetwin.Testbed1", member, signature, list(body))
        )

    def set_in_range(self, address: str, in_range: bool) -> None:
        """Move a wearable out of range (its links drop, it is not heard) or back."""
        self._testbed("SetInRange", "sb", address.upper(), in_range)

    def drop_link(self, address: str) -> None:
        """Drop the link to a wearable, as a supervision timeout does."""
        self._testbed("DropLink", "s", address.upper())

    def disconnect_central(self, address: str) -> None:
        """A third D-Bus client calls Device1.Disconnect on the gateway's device object."""
        self._run(self._acall(device_path(address), "org.bluez.Device1", "Disconnect", "", []))

    def inject_connect_fault(
        self, address: str, error: str, message: str = "", count: int = 1, delay_s: float = 0.0
    ) -> None:
        """Fail the next ``count`` Connects to a wearable with a BlueZ error (0: until removed)."""
        self._testbed("InjectConnectFault", "sssud", address.upper(), error, message, count, delay_s)

    def clear_faults(self, address: str) -> None:
        """Forget injected faults."""
        self._testbed("ClearFaults", "s", address.upper())

    def silence_scan(self, silent: bool = True, adapter_id: int = 0) -> None:
        """Make the gateway's scan go quiet until it is restarted."""
        self._testbed("SilenceScan", "yb", adapter_id, silent)

    def counters(self) -> dict[str, int]:
        """What the gateway did on the radio: connect:<addr>, remove:<addr>, fault:<addr>, ..."""
        (out,) = self._testbed("Counters")
        return {str(k): int(v) for k, v in out.items()}

    def count(self, what: str, address: str) -> int:
        """One counter, e.g. ``count("connect", addr)``."""
        return self.counters().get(f"{what}:{address.upper()}", 0)


@contextmanager
def running_testbed(**kwargs: Any) -> Iterator[Testbed]:
    """A started test bed, stopped on exit."""
    tb = Testbed(**kwargs)
    tb.start()
    try:
        yield tb
    finally:
        tb.stop()


#: The demo's wearable: a heart-rate strap on bed 7.
DEMO_ADDRESS = "C2:00:00:00:00:01"


@contextmanager
def demo_radio(subject: str, record_dir: Path | None = None) -> Iterator[dict[str, Any]]:
    """An emulated radio with one heart-rate strap; yields the ``[[sources]]`` table for it.

    Start it before the event loop (it sets ``DBUS_SYSTEM_BUS_ADDRESS`` for bleak) and keep it up
    while the gateway runs; everything it started is stopped on exit.
    """
    with running_testbed(scan_interval_s=0.2) as tb:
        # The strap slips off at 40 s for 15 s (the demo's fused heart rate carries on).
        tb.wearable(
            "hr",
            DEMO_ADDRESS,
            data=record_dir if record_dir and record_dir.is_dir() else None,
            sensor_off=[(40.0, 15.0)],
        )
        yield {
            "name": "bed-7-strap",
            "driver": "ble",
            "subject": subject,
            "kind": "medical",
            "adapter": "hci0",
            "devices": [{"address": DEMO_ADDRESS, "profile": "hr"}],
            "lost_after_s": 6.0,
        }
