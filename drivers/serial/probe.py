"""``edgetwin check --online`` for a serial source: the port is there, and when free, speaks the protocol.

A port the running gateway (or anything else) holds is reported present and left alone: probing
would steal its bytes.  A free port is listened to as ``edgetwin scan serial --probe`` does.
Each result is ``(level, message, fix)``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from drivers.serial.config import SerialConfig
from drivers.serial.detect import probe as listen
from gateway.errors import ConfigError, EdgetwinError

Finding = tuple[str, str, str]

#: Long enough for two frames of the slowest monitor; check must stay quick.
PROBE_S = 3.0


def probe(name: str, cfg: SerialConfig) -> list[Finding]:
    """The findings for one serial source."""
    port = str(cfg.port)
    where = f"source {name}: {port}"
    if not Path(port).exists():
        return [
            (
                "fail",
                f"{where}: no such port",
                "plug the adapter in, or correct the port (ls /dev/serial/by-id/)",
            )
        ]
    protocols = None if cfg.protocol == "auto" else [cfg.protocol]
    try:
        result = asyncio.run(
            listen(
                port,
                protocols=protocols,
                probe_s=min(cfg.probe_s, PROBE_S),
                allow_start_command=cfg.allow_start_command,
                baudrate=cfg.baudrate,
                who=f"check {name}",
            )
        )
    except ConfigError as exc:
        return [("fail", f"{where}: {str(exc).split(': ', 2)[-1]}", "")]
    except EdgetwinError as exc:
        if "port busy" in str(exc):
            return [("pass", f"{where}: present, in use by another program (not probed)", "")]
        return [("fail", f"{where}: {exc}", "check the cable and the adapter")]
    if result.protocol is None:
        return [
            (
                "fail",
                f"{where}: {result.describe()}",
                "check the cable, that the monitor's serial output is on, and protocol/baudrate in the config",
            )
        ]
    return [("pass", f"{where}: speaks {result.describe()}", "")]
