"""What the downlink remembers across restarts: the newest accepted version, what runs, what was refused.

Kept in ``<state_dir>/downlink/state.json``, replaced atomically (write, fsync, rename), so a
power cut leaves the old or the new state, never half of one.  ``accepted`` only grows: a version
once verified (applied, rolled back or refused for its content) is never taken again - the
anti-rollback counter of the signed envelopes and the "nothing applied twice" of the downlink.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gateway.errors import ConfigError
from gateway.privatefile import write_atomic

# write_atomic stays here for the downlink's modules, which write their files with it.
__all__ = ["REFUSED_KEPT", "DownlinkState", "Pending", "load", "save", "write_atomic"]

REFUSED_KEPT = 8


@dataclass(slots=True)
class Pending:
    """A config revision written in place and not yet proven: the gateway restarted onto it."""

    version: int
    sha256: str
    backup: str  # the previous config file, to restore on rollback
    excused: list[str]  # units not healthy before the restart: not required after it (a device away)
    starts: int = 0  # process starts on this revision (a crash loop rolls back)
    applied_by: str = "process"  # "units": only the units in ``restarted``; "process": the whole gateway
    restarted: list[str] = field(default_factory=list)  # unit names, or why the process restarts


@dataclass(slots=True)
class DownlinkState:
    """The persisted state; see the module docstring."""

    accepted: int = 0
    trust_version: int = 0  # the newest trust set taken over the air (0: the configured trust file)
    applied: dict[str, Any] | None = None  # {"version", "sha256", "at"} of the config running now
    refused: list[dict[str, Any]] = field(default_factory=list)  # newest last
    pending: Pending | None = None
    last_rollback: dict[str, Any] | None = None

    def refuse(
        self, version: int | None, reason: str, detail: str, at: str, units: list[str] | None = None
    ) -> None:
        """Remember a refusal (the newest few); ``units`` names the units a rollback was for."""
        entry: dict[str, Any] = {"version": version, "reason": reason, "detail": detail, "at": at}
        if units:
            entry["units"] = list(units)
        self.refused.append(entry)
        del self.refused[:-REFUSED_KEPT]


def load(path: Path) -> DownlinkState:
    """The state from disk; a fresh state when there is none."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return DownlinkState()
    except (OSError, ValueError) as exc:
        raise _unreadable(path, exc) from exc
    try:
        pending = data.pop("pending", None)
        state = DownlinkState(**data)
        state.pending = Pending(**pending) if pending else None
    except (TypeError, AttributeError) as exc:
        raise _unreadable(path, exc) from exc
    return state


def _unreadable(path: Path, exc: Exception) -> ConfigError:
    # Fail closed: starting afresh would forget the newest accepted version (the anti-rollback counter).
    return ConfigError(
        f"downlink state {path}: unreadable ({type(exc).__name__}: {exc}): the downlink stays off: restore "
        "the file from a backup, or delete it - then only revisions newer than those the twin published "
        "since should be published again"
    )


def save(path: Path, state: DownlinkState) -> None:
    """Replace the state on disk atomically."""
    write_atomic(path, json.dumps(asdict(state), indent=1, sort_keys=True).encode())
