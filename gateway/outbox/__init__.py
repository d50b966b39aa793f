"""The durable outbox: a priority queue of encoded records on SQLite (WAL) between pipeline and uplink.

Contract (ARCHITECTURE.md, core abstraction 5):

* ``put_many`` commits a whole batch in one transaction: durability costs one fsync per batch,
  not one per record (group commit, PERFORMANCE.md).
* ``lease(n)`` hands out up to ``n`` records, alarms first, then oldest first inside a lane.  A
  leased record is not handed out again until it is released.  Leases live in memory only: after
  a restart or a crash every un-acknowledged record is queued again (at-least-once; the uplink's
  sequence numbers let the twin drop duplicates).  How often a record was leased is persisted.
* ``ack`` deletes.  Nothing is deleted before it is acknowledged, except by a lane's stated full
  policy, and every such drop is counted (persisted) and logged as a state change.
* Record ids are never reused (AUTOINCREMENT), so they serve as the gateway's sequence numbers;
  a fresh database gets a new random :attr:`Outbox.epoch`, so a sequence that restarts after a
  corruption recovery is told apart from loss.  ``lease`` can be limited to an id range, which lets
  the uplink send live records first and replay an older backlog behind them.
* Full policy (:data:`DEFAULT_BUDGETS`): alarms are never dropped, even past the total budget;
  features drop their oldest records (a stale feature is worth less than a fresh one);
  diagnostics refuse the newest (the first diagnostics of an outage explain it best).
* A corrupt or unreadable database is renamed to ``<name>.corrupt-<UTC time>``, its ``-wal`` and
  ``-shm`` alongside so that ``sqlite3 <name>.corrupt-<UTC time>`` opens it with its log, logged at
  CRITICAL, and a fresh database is started: the gateway recovers without a human.

Modules: :mod:`~gateway.outbox.records` (records, budgets, statistics), :mod:`~gateway.outbox.store`
(the SQLite store), :mod:`~gateway.outbox.budget` (which records a batch drops),
:mod:`~gateway.outbox.recovery` (damaged files), :mod:`~gateway.outbox.errors` (SQLite error
classes), :mod:`~gateway.outbox.aio` (the event-loop side: group commit and shutdown).
"""

from gateway.outbox.aio import AsyncOutbox
from gateway.outbox.records import (
    DEFAULT_BUDGETS,
    DEFAULT_TOTAL_MAX_BYTES,
    DropReason,
    FullPolicy,
    LaneBudget,
    LaneStats,
    Leased,
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
    "FullPolicy",
    "LaneBudget",
    "LaneStats",
    "Leased",
    "OutItem",
    "Outbox",
    "OutboxStats",
    "record_size",
]
