"""The durable outbox: a priority queue of encoded records on SQLite (WAL) between pipeline and uplink.

Contract (ARCHITECTURE.md, core abstraction 5):

* ``put_many`` commits a whole batch in one transaction: durability costs one fsync per batch,
  not one per record (group commit, PERFORMANCE.md).
* ``lease(n)`` hands out up to ``n`` records, alarms first, then oldest first inside a lane.  A
  leased record is not handed out again until it is released.  Leases live in memory only: after
  a restart or a crash every un-acknowledged record is queued again (at-least-once; the uplink's
  sequence numbers let the twin drop duplicates).  Leasing writes nothing (so the backlog can be
  delivered on a full disk): how often a record was leased is counted by this process only.
  ``release`` never waits: it is applied by the next call that holds the lock.
* ``ack`` deletes, without an fsync of its own (a delete lost to a power cut only resends a
  record; the next commit syncs it).  Nothing is deleted before it is acknowledged, except by a
  lane's stated full policy, and every such drop is counted (persisted) and logged as a state change.  Records the
  uplink cannot send go to a kept ``dead`` table (``dead_letter``), counted too.
* One persisted set of drop counters, by lane and :class:`DropReason`, for every drop anywhere
  (budget, age, corrupt, disk full, queue full, oversize, dead letter): in the database and in
  ``<name>.state``, a small file written in place after every change, so it outlives the database.
* Record ids are never reused, so they serve as the gateway's sequence numbers, within a random
  :attr:`Outbox.epoch`.  Any recovery that may have lost committed records (a log or database set
  aside, a log damaged mid-way, a database that is not the one last used) starts a new epoch whose
  ids begin above an id floor reserved in the state file, counts what was lost as ``corrupt`` and
  records a :class:`LossEvent`.  ``lease`` can be limited to an id range, which lets the uplink
  send live records first and replay an older backlog behind them.
* A full disk degrades rather than stops: a reserve file is given back at the first SQLITE_FULL,
  alarms are still written, lower lanes refused and counted, the backlog delivered; once space
  returns the reserve is taken again.  Opening works on a full disk.
* Full policy (:data:`DEFAULT_BUDGETS`): alarms are never dropped, even past the total budget;
  features drop their oldest records (a stale feature is worth less than a fresh one);
  diagnostics refuse the newest (the first diagnostics of an outage explain it best).
* A corrupt or unreadable database is renamed to ``<name>.corrupt-<UTC time>``, its ``-wal`` and
  ``-shm`` alongside so that ``sqlite3 <name>.corrupt-<UTC time>`` opens it with its log, logged at
  CRITICAL, and a fresh database is started: the gateway recovers without a human.

Modules: :mod:`~gateway.outbox.records` (records, budgets, statistics), :mod:`~gateway.outbox.store`
(the SQLite queue), :mod:`~gateway.outbox.budget` (which records a batch drops),
:mod:`~gateway.outbox.recovery` (damaged logs and databases), :mod:`~gateway.outbox.state` (the state
file: epoch, id floor, counters), :mod:`~gateway.outbox.space` (the full-disk reserve),
:mod:`~gateway.outbox.errors` (SQLite error classes), :mod:`~gateway.outbox.aio` (the event-loop side:
group commit, bounded pending bytes, shutdown).
"""

from gateway.outbox.aio import AsyncOutbox
from gateway.outbox.records import (
    DEFAULT_BUDGETS,
    DEFAULT_TOTAL_MAX_BYTES,
    DropReason,
    DropReport,
    FullPolicy,
    LaneBudget,
    LaneStats,
    LastDrop,
    Leased,
    LossEvent,
    OutboxStats,
    OutItem,
    record_size,
)
from gateway.outbox.store import Outbox

__all__ = [
    "DEFAULT_BUDGETS",
    "DEFAULT_TOTAL_MAX_BYTES",
    "AsyncOutbox",
    "DropReason",
    "DropReport",
    "FullPolicy",
    "LaneBudget",
    "LaneStats",
    "LastDrop",
    "Leased",
    "LossEvent",
    "OutItem",
    "Outbox",
    "OutboxStats",
    "record_size",
]
