"""Serial ports are one program's at a time: a second opener is refused with the holder's PID.

Real ptys (the simulated MCU node's, a socat pair) and real second programs (the ``edgetwin``
command line, a pyserial reader) in their own processes.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from peers import RecordingSink, cli_start_s, running_driver, socat_ptys

from drivers.mcu.config import McuConfig, SimNodeConfig
from drivers.mcu.driver import factory
from drivers.mcu.link import Link
from drivers.mcu.simnode import run_sim_node
from drivers.portlock import PortInUseError
from drivers.serial.port import open_port
from drivers.serial.protocol import LineSettings
from gateway.contracts import SourceInfo

EDGETWIN = [sys.executable, "-m", "gateway.cli"]


def test_a_firmware_command_cannot_take_the_port_a_running_driver_reads(tmp_path: Path) -> None:
    async def main() -> tuple[subprocess.CompletedProcess[str], dict[str, float], float]:
        sink = RecordingSink(samples=False)
        node_cfg = SimNodeConfig(node_id="MOTOR-7731", seed=3, flash=tmp_path / "flash.bin")
        async with run_sim_node(node_cfg, "test node") as node:
            driver = factory(
                SourceInfo("motor7-adc", "plant-A/motor-7", "industrial"), McuConfig(port=node.path)
            )
            async with running_driver(driver, sink):
                t0 = time.monotonic()
                cli = await asyncio.to_thread(
                    subprocess.run,
                    [*EDGETWIN, "firmware", "status", "--port", str(node.path)],
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                took = time.monotonic() - t0
                # Also refused in this process: a second Link on the same port.
                with pytest.raises(PortInUseError, match="in use by"):
                    async with Link(node.path, who="second reader"):
                        pass
                n = len(sink.blocks)
                await asyncio.sleep(0.5)
                assert len(sink.blocks) > n  # the driver kept reading throughout
                return cli, driver.snapshot(), took

    cli, snap, took = asyncio.run(main())
    baseline = cli_start_s()
    assert cli.returncode == 1, cli
    assert f"in use by PID {os.getpid()}" in cli.stderr, cli.stderr
    assert "stop that program (or that source of the gateway) first" in cli.stderr
    # Refused at once (interpreter start-up, as the baseline), not after a slow, garbled exchange.
    assert took < 3 * baseline + 5, (took, baseline)
    assert snap.get("lost_samples", 0) == 0
    assert snap["corrupt_frames"] == 0


@pytest.fixture
def pty_pair(tmp_path: Path) -> Iterator[Path]:
    if shutil.which("socat") is None:
        pytest.skip("socat is not installed (apt install socat)")
    a = tmp_path / "monitor"
    with socat_ptys(a, tmp_path / "device"):
        yield a


def test_the_serial_driver_names_the_program_that_holds_its_port(pty_pair: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import serial, sys, time\n"
            "s = serial.Serial(sys.argv[1], exclusive=True)\n"
            "print('held', flush=True)\n"
            "time.sleep(60)\n",
            str(pty_pair),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(PortInUseError) as caught:
            open_port("serial oximeter-1", str(pty_pair), LineSettings(9600))
        message = str(caught.value)
        assert f"in use by PID {holder.pid} (" in message, message
        assert message.startswith(f"serial oximeter-1 port {pty_pair}: in use by PID")
    finally:
        holder.kill()
        holder.wait(timeout=5)
        if holder.stdout is not None:
            holder.stdout.close()
    # Once the holder is gone, the port opens (the lock went with its descriptor).
    port = open_port("serial oximeter-1", str(pty_pair), LineSettings(9600))
    port.close()
