"""Several windows of one subject in one message (schema 4), joined at publish time.

The outbox stores every window as a pack of its own; the uplink joins the stored packs of one
topic into one message just before publishing, so nothing is held anywhere but in the outbox.
The message is one SenML pack: one sequence record naming every record's id (its own ``v``, then
the steps ``ds``), then each record as stored, except that a later window leaves out

* header fields that are as in the header before it (``bn``, ``sv``, ``svm``, ``run``, ``tm_``,
  ``u``, ``v``, ``kind``, ``hb``: :data:`~gateway.records.codec.INHERITED`), and
* for a stream that is the one at the same place in the window before it (same metric, unit,
  code, shape and device), its name and those fields, and its resolution ``r`` when that is the
  same too.

:func:`gateway.records.decode_batch` gives every record back exactly as a message of its own
would.  ``docs/records.md`` (*Several windows in one message*) is the reference.
"""

from __future__ import annotations

import itertools
from typing import Any

import cbor2

from gateway.records.codec import (
    BT,
    FEATURE_ORDER,
    INHERITED,
    N,
    _array_head,
    decode,
    seq_record,
    wire_integer,
    wrap,
)
from gateway.records.errors import RecordError
from gateway.records.model import FeaturesWindow, SeqMeta, StreamWindow

#: Fields that name a stream; a stream that is the one before it in its place leaves them out.
_IDENTITY = (N, "mu", "metric", "mdc", "sh", "dev")


def _identity(s: StreamWindow) -> tuple[Any, ...]:
    return (s.metric, s.unit, s.mdc, s.shape, s.dev)


def _is_stream(rec: dict[Any, Any]) -> bool:
    return "f" in rec or "eq" in rec or "gap" in rec


class Joiner:
    """Joins stored window packs of one topic into one message, up to a size limit."""

    def __init__(self, epoch: int, *, historical: bool, batch_s: float | None, limit: int) -> None:
        self._epoch = epoch
        self._historical = historical
        self._batch_s = batch_s
        self._limit = limit
        self.ids: list[int] = []
        self._parts: list[bytes] = []
        self._count = 0  # SenML records, the sequence record not included
        self._body = 0
        self._head: dict[Any, Any] = {}
        self._streams: tuple[StreamWindow, ...] = ()
        self._win = 0.0

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, pack: bytes, seq: int) -> bool:
        """Join a stored pack; False (nothing changed) when it cannot follow or the message would be too large."""
        try:
            recs = cbor2.loads(pack)
            window = decode(pack)
        except (RecordError, ValueError, EOFError, TypeError, cbor2.CBORDecodeError):
            return False  # published alone, where an unreadable record is handled
        if not isinstance(recs, list) or not recs or not isinstance(recs[0], dict):
            return False
        head = recs[0]
        if head.get(N) != "win" or not isinstance(head.get("sv"), int) or head["sv"] < 4:
            return False  # only windows of schema 4: an older record goes alone, as it was written
        if self.ids and seq <= self.ids[-1]:
            return False
        if not isinstance(window, FeaturesWindow):
            return False
        streams = window.streams
        parts = [pack[len(_array_head(len(recs))) :]] if not self.ids else self._later(recs, window)
        if parts is None:
            return False
        ids = [*self.ids, seq]
        body = self._body + sum(len(p) for p in parts)
        size = len(_array_head(self._count + len(recs) + 1)) + len(self._seq(ids)) + body
        if self.ids and size > self._limit:
            return False
        self.ids, self._body, self._count = ids, body, self._count + len(recs)
        self._parts += parts
        self._head, self._streams, self._win = head, streams, window.win
        return True

    def _later(self, recs: list[Any], window: FeaturesWindow) -> list[bytes] | None:
        """A later window's records with what the window before it already says left out."""
        head = dict(recs[0])
        for label in INHERITED:
            if (label in head) != (label in self._head):
                return None  # an absent field cannot be told from an inherited one: not joined
            if label in head and head[label] == self._head[label]:
                del head[label]
        if BT not in head:
            return None
        out = [head]
        streams = window.streams
        index = 0
        for raw in recs[1:]:
            rec = dict(raw)
            if _is_stream(rec) and index < len(streams):
                cur = streams[index]
                before = self._streams[index] if index < len(self._streams) else None
                if before is not None and _identity(before) == _identity(cur):
                    for label in _IDENTITY:
                        rec.pop(label, None)
                    if "f" in rec:
                        if rec.get("r") == before.res:
                            rec.pop("r", None)
                        elif "r" not in rec:
                            rec["r"] = None  # no resolution, where the stream before had one
                        if window.win == self._win:
                            self._steps(rec, before, cur)
                index += 1
            out.append(rec)
        return [bytes(cbor2.dumps(rec, canonical=True)) for rec in out]

    def _steps(self, rec: dict[Any, Any], before: StreamWindow, cur: StreamWindow) -> None:
        """Send the features as steps from the stream before (``fd``) where that is shorter.

        Only when both are at one resolution in windows of one length: the steps are counts of
        the same unit.
        """
        if before.res != cur.res or cur.res is None:
            return
        names = [str(k) for k in rec["fn"]] if "fn" in rec else FEATURE_ORDER.get(cur.shape or "level", ())
        steps: list[Any] = []
        for name, q in zip(names, rec["f"], strict=False):
            if isinstance(q, int):
                base = wire_integer(before, name, self._win)
                if base is None:
                    return  # nothing to step from: the values go as they are
                steps.append(q - base)
            else:
                steps.append(q)  # null, or a value sent unscaled: as it is
        if len(cbor2.dumps(steps)) < len(cbor2.dumps(rec["f"])):
            rec["fd"] = steps
            del rec["f"]

    def _seq(self, ids: list[int]) -> bytes:
        steps = [b - a for a, b in itertools.pairwise(ids)]
        return seq_record(SeqMeta(ids[0], self._epoch, self._historical, self._batch_s), steps)

    def payload(self) -> bytes:
        """The message: one sequence record for every id, then the records."""
        if not self.ids:
            raise ValueError("records joiner: nothing joined: add a pack first")
        return _array_head(self._count + 1) + self._seq(self.ids) + b"".join(self._parts)


def join(
    packs: list[tuple[bytes, int]],
    epoch: int,
    *,
    historical: bool = False,
    batch_s: float | None = None,
    limit: int = 1 << 30,
) -> list[bytes]:
    """Messages for stored packs with their ids, in order: as many joined per message as can be."""
    out: list[bytes] = []
    joiner: Joiner | None = None
    for pack, seq in packs:
        if joiner is not None and joiner.add(pack, seq):
            continue
        if joiner is not None:
            out.append(joiner.payload())
        joiner = Joiner(epoch, historical=historical, batch_s=batch_s, limit=limit)
        if not joiner.add(pack, seq):
            out.append(wrap(pack, SeqMeta(seq, epoch, historical, batch_s)))
            joiner = None
    if joiner is not None:
        out.append(joiner.payload())
    return out
