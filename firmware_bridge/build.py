"""Builds the host simulated node from ``firmware/`` with the machine's C compiler.

The binary is cached under a directory keyed by the sources, the compiler and the libsodium
choice, so it is built once per change; concurrent builders wait on a lock file and the result
is renamed into place atomically.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from gateway.errors import ConfigError

_LOGGER = logging.getLogger(__name__)

FIRMWARE_DIR = Path(__file__).parent / "firmware"
LIB_SOURCES = ("fwb_codec.c", "fwb_sha256.c", "fwb_update.c", "fwb_node.c")
WARNINGS = (
    "-std=c99",
    "-Wall",
    "-Wextra",
    "-Wshadow",
    "-Wstrict-prototypes",
)  # no -Werror: a newer compiler must not stop a demo
_SODIUM_PROBE = "#include <sodium.h>\nint main(void){return sodium_init();}\n"
_BUILD_TIMEOUT_S = 120.0


def compiler() -> str:
    """The C compiler: $CC, else cc, gcc or clang on PATH; ConfigError when there is none."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    raise ConfigError(
        "firmware_bridge build: no C compiler: the simulated node is built from source: "
        "install gcc (apt-get install gcc) or set CC"
    )


def have_sodium(cc: str) -> bool:
    """True when libsodium's header and library are available to ``cc``."""
    with tempfile.TemporaryDirectory(prefix="fwb-probe-") as tmp:
        src = Path(tmp) / "probe.c"
        src.write_text(_SODIUM_PROBE, encoding="ascii")
        result = subprocess.run(  # noqa: S603 - fixed arguments, compiler from PATH
            [cc, str(src), "-lsodium", "-o", str(Path(tmp) / "probe")],
            capture_output=True,
            check=False,
            timeout=_BUILD_TIMEOUT_S,
        )
        return result.returncode == 0


def cache_dir() -> Path:
    """Where built binaries are kept: $EDGETWIN_FWB_CACHE, the user's cache, or the temp dir."""
    env = os.environ.get("EDGETWIN_FWB_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    home = Path(xdg) if xdg else Path.home() / ".cache"
    if os.access(home, os.W_OK) or (not home.exists() and os.access(home.parent, os.W_OK)):
        return home / "edgetwin" / "fwb"
    return Path(tempfile.gettempdir()) / f"edgetwin-fwb-{os.getuid()}"


def _digest(cc: str, sodium: bool) -> str:
    h = hashlib.sha256(f"{cc}|{sodium}|{' '.join(WARNINGS)}".encode())
    for name in (*LIB_SOURCES, "sim_node.c", "fwb.h"):
        h.update((FIRMWARE_DIR / name).read_bytes())
    return h.hexdigest()[:16]


def build_sim_node(out_dir: Path | None = None, *, sodium: bool | None = None) -> Path:
    """The simulated node's binary, built if needed; ``sodium=None`` uses libsodium when present."""
    cc = compiler()
    use_sodium = have_sodium(cc) if sodium is None else sodium
    base = out_dir if out_dir is not None else cache_dir()
    target = base / f"sim_node-{_digest(cc, use_sodium)}{'-sodium' if use_sodium else ''}"
    if target.exists():
        return target
    base.mkdir(parents=True, exist_ok=True)
    with (base / ".build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():  # built by another process while we waited
            return target
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        cmd = [
            cc,
            *WARNINGS,
            "-O2",
            *(["-DFWB_HAVE_SODIUM"] if use_sodium else []),
            "-o",
            str(tmp),
            str(FIRMWARE_DIR / "sim_node.c"),
            *(str(FIRMWARE_DIR / s) for s in LIB_SOURCES),
            *(["-lsodium"] if use_sodium else []),
            "-lm",
        ]
        try:
            result = subprocess.run(  # noqa: S603 - our own sources, compiler from PATH
                cmd, capture_output=True, text=True, check=False, timeout=_BUILD_TIMEOUT_S
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConfigError(
                f"firmware_bridge build {target}: cannot run {cc}: {exc}: check the C compiler"
            ) from exc
        if result.returncode != 0:
            raise ConfigError(
                f"firmware_bridge build {target}: {cc} failed (exit {result.returncode}): "
                f"{result.stderr.strip()[-2000:]}: fix the compiler setup or report the error"
            )
        tmp.replace(target)
        _LOGGER.info("built the simulated node %s (%s)", target, "libsodium" if use_sodium else "hash-only")
    return target
