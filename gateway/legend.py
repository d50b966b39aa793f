"""The local legend: which pseudonym is which bed, patient, machine, device, source or node.

A technician reading the twin view sees pseudonyms only.  The gateway notes every identity it
pseudonymizes (purpose, identity, source) in ``<state_dir>/legend.json`` (mode 0600, beside the
site key) and ``edgetwin legend`` prints the table with the pseudonyms of the current key.  The
legend is never sent: it holds exactly what the anonymizer keeps from leaving.  Only identities
are stored, never pseudonyms, so a rotated key gives a legend of the new pseudonyms.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.errors import ConfigError
from gateway.privatefile import WriteFailures, writer_of

if TYPE_CHECKING:
    from gateway.config import Config

log = logging.getLogger(__name__)

FILE_NAME = "legend.json"


@dataclass(frozen=True, slots=True, order=True)
class Entry:
    """One identity the gateway pseudonymized."""

    purpose: str  # "gateway", "subject", "device", "source" or "node" (one never resolved)
    identity: str  # the real id: never sent
    source: str = ""  # the config's source it came from, when known


class Legend:
    """Identities seen, persisted on first sight (a small file rewritten by its file's worker thread per new identity)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._entries: set[Entry] = set(load(path)) if path is not None else set()
        self._writer = writer_of(path) if path is not None else None
        # The legend is a convenience for technicians: never a reason to stop the data.
        self._failures = WriteFailures(log, "legend", path, "the legend misses new identities")
        # Noted from the loop and from the threads that build the pipeline: each state is taken and
        # asked for in one go, so an older one is never asked for after a newer one.
        self._lock = threading.Lock()

    def note(self, purpose: str, identity: str, source: str = "") -> None:
        """Remember an identity; written to the file (off the event loop) the first time it is seen."""
        entry = Entry(purpose, identity, source)
        if entry in self._entries:
            return
        with self._lock:
            self._entries.add(entry)
            if self._writer is None:
                return
            body = [[e.purpose, e.identity, e.source] for e in sorted(self._entries)]
            self._writer.submit(json.dumps(body).encode(), self._failures)

    def entries(self) -> list[Entry]:
        """Every identity noted, sorted."""
        return sorted(self._entries)


def load(path: Path | None) -> list[Entry]:
    """The entries of a legend file (none when it does not exist or cannot be read)."""
    if path is None:
        return []
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
        return [Entry(str(p), str(i), str(s)) for p, i, s in body]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, TypeError) as exc:
        log.warning("legend %s: unreadable (%s): it starts again", path, exc)
        return []


def rows(config: Config) -> list[tuple[str, str, str, str]]:
    """(pseudonym as sent, what, identity, source) of the config's identities and those its state has seen."""
    # Imported here: the anonymizer notes into a Legend, so it imports this module.
    from gateway.anonymize import Pseudonymizer, load_or_create_key  # noqa: PLC0415

    core = config.core
    pseudonym = Pseudonymizer(load_or_create_key(core.site_key_path))
    noted = [Entry("gateway", core.gateway.name)]
    noted += [
        Entry("subject", s, e.info.name) for e in config.sources for s in {e.info.subject, *e.subjects()}
    ]
    noted += [Entry("source", e.info.name) for e in config.sources]
    noted += load(core.gateway.state_dir / FILE_NAME)
    sources: dict[tuple[str, str], set[str]] = {}
    for e in noted:
        sources.setdefault((e.purpose, e.identity), set()).update({e.source} - {""})
    out = []
    for purpose, identity in sorted(sources, key=lambda k: (_ORDER.get(k[0], 9), k[1])):
        sent = pseudonym(purpose, identity)
        # A source is named in the downlink's reported state with its kind before the pseudonym.
        sent = f"source~{sent}" if purpose == "source" else sent
        out.append((sent, purpose, identity, ", ".join(sorted(sources[(purpose, identity)]))))
    return out


def render(config: Config, *, as_json: bool = False) -> str:
    """The legend of a configured gateway as a table (or JSON rows, for ``twin ... --legend``)."""
    found = rows(config)
    if as_json:
        keys = ("pseudonym", "what", "identity", "source")
        return json.dumps([dict(zip(keys, row, strict=True)) for row in found], indent=1)
    table = [("pseudonym", "what", "identity", "source"), *found]
    widths = [max(len(r[i]) for r in table) for i in range(3)]
    lines = [f"{p:<{widths[0]}}  {w:<{widths[1]}}  {i:<{widths[2]}}  {s}".rstrip() for p, w, i, s in table]
    return "LOCAL ONLY - real identities: never copy this out of the site.\n" + "\n".join(lines)


def names(path: Path) -> dict[str, str]:
    """Pseudonym as sent -> identity, from a file of ``edgetwin legend --json`` (the twin's ``--legend``)."""
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
        return {str(row["pseudonym"]): str(row["identity"]) for row in body}
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ConfigError(
            f"legend {path}: unreadable ({type(exc).__name__}: {exc}): give the output of "
            "'edgetwin legend --config FILE --json' on the site"
        ) from exc


_ORDER = {"gateway": 0, "subject": 1, "device": 2, "source": 3, "node": 4}
