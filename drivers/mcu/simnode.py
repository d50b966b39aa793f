"""Running the host-built simulated node as a child process on its own pseudo-terminal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from drivers.mcu.config import SimNodeConfig
from firmware_bridge.build import build_sim_node
from gateway.errors import TransientError

_LOGGER = logging.getLogger(__name__)

_START_TIMEOUT_S = 10.0
_STOP_DEADLINE_S = 3.0


def sim_node_args(cfg: SimNodeConfig, flash: Path, link: Path | None = None) -> list[str]:
    """Command-line arguments of the simulated node for a config."""
    args = [
        "--flash",
        str(flash),
        "--node-id",
        cfg.node_id,
        "--seed",
        str(cfg.seed),
        "--drift-ppm",
        repr(cfg.drift_ppm),
        "--trial-timeout-ms",
        str(round(cfg.trial_timeout_s * 1000)),
    ]
    if link is not None:
        args += ["--link", str(link)]
    if cfg.pubkey_file is not None:
        args += ["--pubkey-file", str(cfg.pubkey_file)]
    for name, p in (("drop", cfg.drop_prob), ("corrupt", cfg.corrupt_prob), ("garbage", cfg.garbage_prob)):
        if p:
            args += [f"--{name}-prob", repr(p)]
    return args


@dataclass(frozen=True, slots=True)
class RunningSimNode:
    """A started simulated node: the pty it serves and its process."""

    path: Path
    process: asyncio.subprocess.Process


async def stop_process(proc: asyncio.subprocess.Process, who: str) -> None:
    """SIGTERM, wait up to a deadline, then SIGKILL; never raises on an already-gone process."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), _STOP_DEADLINE_S)
        except TimeoutError:
            _LOGGER.warning("%s: did not stop within %.0f s of SIGTERM, killing it", who, _STOP_DEADLINE_S)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


@contextlib.asynccontextmanager
async def run_sim_node(
    cfg: SimNodeConfig, who: str, extra_args: tuple[str, ...] = ()
) -> AsyncIterator[RunningSimNode]:
    """Build and start a simulated node; yield its pty path and process; stop it on exit."""
    binary = await asyncio.to_thread(build_sim_node)
    with tempfile.TemporaryDirectory(prefix="edgetwin-simnode-") as tmp:
        flash = cfg.flash if cfg.flash is not None else Path(tmp) / "flash.bin"
        proc = await asyncio.create_subprocess_exec(
            str(binary),
            *sim_node_args(cfg, flash),
            *extra_args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            assert proc.stdout is not None
            try:
                line = await asyncio.wait_for(proc.stdout.readline(), _START_TIMEOUT_S)
            except TimeoutError as exc:
                raise TransientError(
                    f"{who}: the simulated node did not start within {_START_TIMEOUT_S:g} s"
                ) from exc
            text = line.decode(errors="replace").strip()
            if not text.startswith("PTY "):
                raise TransientError(
                    f"{who}: the simulated node failed to start (exit {proc.returncode}, said {text!r}): "
                    "check its flash file and options"
                )
            path = Path(text[4:])
            _LOGGER.info("%s: simulated node running on %s (pid %d)", who, path, proc.pid)
            yield RunningSimNode(path, proc)
        finally:
            await asyncio.shield(stop_process(proc, who))
