"""The outbox's contract, on real SQLite files: ordering, leases, budgets, crashes and corruption."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from gateway.contracts import Lane
from gateway.errors import ConfigError
from gateway.outbox import (
    DEFAULT_BUDGETS,
    AsyncOutbox,
    FullPolicy,
    LaneBudget,
    Leased,
    Outbox,
    OutItem,
    record_size,
)

REPO = Path(__file__).resolve().parents[1]
NOW = 1_760_000_000.0  # a fixed, plausible wall time
LOGGER = "gateway.outbox"


def item(lane: Lane, i: int, *, size: int = 100, t_wall: float = NOW) -> OutItem:
    """A record whose payload encodes its number, so it can be checked byte for byte."""
    head = f"{lane.name}:{i}:".encode()
    return OutItem(lane, f"t/{i:04d}", head + b"x" * (size - len(head)), t_wall)


def drain(ob: Outbox) -> list[Leased]:
    """Lease everything that is not leased yet."""
    return ob.lease(1_000_000)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "outbox.db"


@pytest.fixture
def ob(db: Path) -> Iterator[Outbox]:
    with Outbox(db) as outbox:
        yield outbox


UNBOUNDED = {
    Lane.ALARMS: LaneBudget(None, None, FullPolicy.NEVER_DROP),
    Lane.FEATURES: LaneBudget(None, None, FullPolicy.DROP_OLDEST),
    Lane.DIAGNOSTICS: LaneBudget(None, None, FullPolicy.DROP_NEWEST),
}
SIZE = record_size(item(Lane.FEATURES, 0))  # every record in the budget tests has this size


# --- queue semantics -------------------------------------------------------------------------------


def test_lease_orders_by_lane_then_fifo(ob: Outbox) -> None:
    ob.put_many([item(Lane.DIAGNOSTICS, 0), item(Lane.FEATURES, 1), item(Lane.ALARMS, 2)])
    ob.put_many([item(Lane.FEATURES, 3), item(Lane.ALARMS, 4), item(Lane.DIAGNOSTICS, 5)])
    got = [(r.lane, r.topic) for r in ob.lease(10)]
    assert got == [
        (Lane.ALARMS, "t/0002"),
        (Lane.ALARMS, "t/0004"),
        (Lane.FEATURES, "t/0001"),
        (Lane.FEATURES, "t/0003"),
        (Lane.DIAGNOSTICS, "t/0000"),
        (Lane.DIAGNOSTICS, "t/0005"),
    ]


def test_lease_returns_exact_records_and_respects_n(ob: Outbox) -> None:
    items = [item(Lane.FEATURES, i, size=50 + i) for i in range(5)]
    ob.put_many(items)
    first = ob.lease(2)
    assert [(r.topic, r.payload, r.t_wall, r.attempts) for r in first] == [
        (i.topic, i.payload, i.t_wall, 0) for i in items[:2]
    ]
    assert ob.lease(0) == []
    assert len(ob.lease(100)) == 3


def test_leased_records_are_not_leased_again_until_released(ob: Outbox) -> None:
    ob.put_many([item(Lane.FEATURES, i) for i in range(4)])
    a = ob.lease(2)
    b = ob.lease(10)
    assert {r.id for r in a}.isdisjoint(r.id for r in b)
    assert ob.lease(10) == []
    ob.release([a[1].id, a[0].id, 999_999])  # an unknown id is ignored
    again = ob.lease(10)
    assert [r.id for r in again] == [a[0].id, a[1].id]  # back at their old position
    assert [r.attempts for r in again] == [1, 1]


def test_release_puts_records_back_before_younger_ones(ob: Outbox) -> None:
    ob.put_many([item(Lane.FEATURES, i) for i in range(3)])
    leased = ob.lease(1)
    ob.put(item(Lane.FEATURES, 3))
    ob.release([leased[0].id])
    assert [r.topic for r in ob.lease(10)] == ["t/0000", "t/0001", "t/0002", "t/0003"]


def test_ack_deletes_only_leased_records(ob: Outbox) -> None:
    ob.put_many([item(Lane.FEATURES, i) for i in range(3)])
    leased = ob.lease(2)
    ob.ack([leased[0].id])
    stats = ob.stats()
    assert stats.lanes[Lane.FEATURES].queued == 2
    assert stats.lanes[Lane.FEATURES].leased == 1
    ob.release([leased[1].id])
    ob.ack([leased[1].id, leased[0].id, 424242])  # none of these is leased now: nothing happens
    assert ob.stats().lanes[Lane.FEATURES].queued == 2
    assert [r.topic for r in drain(ob)] == ["t/0001", "t/0002"]


def test_ack_is_durable(db: Path) -> None:
    with Outbox(db) as ob:
        ob.put_many([item(Lane.ALARMS, i) for i in range(3)])
        ob.ack([r.id for r in ob.lease(2)])
    with Outbox(db) as ob:
        assert [r.topic for r in drain(ob)] == ["t/0002"]


def test_nothing_deleted_before_ack_and_reopen_requeues_leases(db: Path) -> None:
    items = [item(Lane(i % 3), i) for i in range(30)]
    with Outbox(db) as ob:
        ob.put_many(items)
        first = ob.lease(10)
        ob.lease(5)
        ob.release([first[0].id])
        again = ob.lease(1)
        assert [r.id for r in again] == [first[0].id]
        assert again[0].attempts == 1  # leased once before, by this process
    with Outbox(db) as ob:
        stats = ob.stats()
        assert stats.queued == 30
        assert all(s.leased == 0 for s in stats.lanes.values())
        leased = drain(ob)
    assert sorted(r.payload for r in leased) == sorted(i.payload for i in items)
    # Leasing writes nothing (it must work on a full disk), so attempts start over after a restart.
    assert [r.attempts for r in leased] == [0] * 30


def test_ids_are_never_reused_after_the_queue_empties(db: Path) -> None:
    with Outbox(db) as ob:
        ob.put(item(Lane.FEATURES, 0))
        old = ob.lease(1)[0].id
        ob.ack([old])
    with Outbox(db) as ob:
        ob.put(item(Lane.FEATURES, 1))
        assert ob.lease(1)[0].id > old


def test_put_many_is_one_transaction(ob: Outbox) -> None:
    bad = OutItem(Lane.FEATURES, "t/bad", cast(bytes, ["not", "bytes"]), NOW)
    with pytest.raises(sqlite3.ProgrammingError):
        ob.put_many([item(Lane.FEATURES, 0), item(Lane.ALARMS, 1), bad])
    assert ob.stats().queued == 0
    ob.put(item(Lane.FEATURES, 2))  # and the outbox still works
    assert [r.topic for r in drain(ob)] == ["t/0002"]


def test_stats_report_bytes_and_oldest_age(ob: Outbox) -> None:
    now = time.time()
    ob.put_many([item(Lane.FEATURES, 0, t_wall=now - 60), item(Lane.FEATURES, 1, t_wall=now)])
    lane = ob.stats().lanes[Lane.FEATURES]
    assert lane.queued_bytes == 2 * SIZE
    assert lane.oldest_age_s is not None
    assert 59 <= lane.oldest_age_s < 120
    assert ob.stats().lanes[Lane.ALARMS].oldest_age_s is None
    assert ob.stats().total_bytes == 2 * SIZE


def test_concurrent_threads_lose_nothing(ob: Outbox) -> None:
    producers, per_thread = 4, 300
    delivered: list[bytes] = []

    def produce(k: int) -> None:
        for start in range(0, per_thread, 30):
            ob.put_many([item(Lane(k % 3), k * 10_000 + i) for i in range(start, start + 30)])

    def consume(stop: threading.Event) -> None:
        while not stop.is_set() or ob.stats().queued:
            batch = ob.lease(50)
            if not batch:
                time.sleep(0.001)
            delivered.extend(r.payload for r in batch)
            ob.ack([r.id for r in batch])

    stop = threading.Event()
    consumer = threading.Thread(target=consume, args=(stop,))
    consumer.start()
    threads = [threading.Thread(target=produce, args=(k,)) for k in range(producers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    consumer.join(timeout=30)
    expected = sorted(
        item(Lane(k % 3), k * 10_000 + i).payload for k in range(producers) for i in range(per_thread)
    )
    assert sorted(delivered) == expected


# --- budgets ---------------------------------------------------------------------------------------


def test_default_budgets_state_a_policy_per_lane() -> None:
    assert DEFAULT_BUDGETS[Lane.ALARMS] == LaneBudget(None, None, FullPolicy.NEVER_DROP)
    assert DEFAULT_BUDGETS[Lane.FEATURES].policy is FullPolicy.DROP_OLDEST
    assert DEFAULT_BUDGETS[Lane.DIAGNOSTICS].policy is FullPolicy.DROP_NEWEST


def test_alarms_are_never_dropped_even_far_over_budget(db: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    with Outbox(db, total_max_bytes=5 * SIZE) as ob:
        for i in range(0, 100, 10):
            ob.put_many([item(Lane.ALARMS, j) for j in range(i, i + 10)])
        stats = ob.stats()
        assert stats.lanes[Lane.ALARMS].queued == 100
        assert stats.total_bytes == 100 * SIZE
        assert stats.dropped_total == 0
        over = [r for r in caplog.records if "over the total budget" in r.getMessage()]
        assert len(over) == 1  # a state change, not one line per batch
        assert over[0].levelno == logging.WARNING
        ob.ack([r.id for r in ob.lease(96)])
        assert any("back within the total budget" in r.getMessage() for r in caplog.records)


def test_alarms_displace_features_when_the_total_is_full(db: Path) -> None:
    with Outbox(db, budgets=UNBOUNDED, total_max_bytes=10 * SIZE) as ob:
        ob.put_many([item(Lane.FEATURES, i) for i in range(8)])
        ob.put_many([item(Lane.ALARMS, 100 + i) for i in range(6)])
        stats = ob.stats()
        assert stats.lanes[Lane.ALARMS].queued == 6
        assert stats.lanes[Lane.FEATURES].queued == 4
        assert stats.lanes[Lane.FEATURES].dropped == {"budget": 4}
        assert [r.topic for r in drain(ob) if r.lane is Lane.FEATURES] == [f"t/{i:04d}" for i in range(4, 8)]


def test_features_drop_oldest_unleased_and_count(db: Path) -> None:
    budgets = {**UNBOUNDED, Lane.FEATURES: LaneBudget(10 * SIZE, None, FullPolicy.DROP_OLDEST)}
    with Outbox(db, budgets=budgets, total_max_bytes=None) as ob:
        ob.put_many([item(Lane.FEATURES, i) for i in range(10)])
        leased = ob.lease(2)  # in flight: not droppable
        ob.put_many([item(Lane.FEATURES, i) for i in range(10, 13)])
        stats = ob.stats().lanes[Lane.FEATURES]
        assert stats.queued == 10
        assert stats.queued_bytes == 10 * SIZE
        assert stats.dropped == {"budget": 3}
        assert [r.topic for r in leased] == ["t/0000", "t/0001"]
        rest = [r.topic for r in drain(ob)]
        assert rest == [f"t/{i:04d}" for i in range(5, 13)]


def test_features_batch_bigger_than_budget_keeps_the_newest(db: Path) -> None:
    budgets = {**UNBOUNDED, Lane.FEATURES: LaneBudget(4 * SIZE, None, FullPolicy.DROP_OLDEST)}
    with Outbox(db, budgets=budgets) as ob:
        ob.put_many([item(Lane.FEATURES, i) for i in range(10)] + [item(Lane.ALARMS, 99)])
        assert [r.topic for r in drain(ob)] == ["t/0099", "t/0006", "t/0007", "t/0008", "t/0009"]
        assert ob.stats().lanes[Lane.FEATURES].dropped == {"budget": 6}


def test_diagnostics_refuse_newest_and_count(db: Path) -> None:
    budgets = {**UNBOUNDED, Lane.DIAGNOSTICS: LaneBudget(5 * SIZE, None, FullPolicy.DROP_NEWEST)}
    with Outbox(db, budgets=budgets) as ob:
        ob.put_many([item(Lane.DIAGNOSTICS, i) for i in range(4)])
        ob.put_many([item(Lane.DIAGNOSTICS, i) for i in range(4, 8)])
        ob.put(item(Lane.DIAGNOSTICS, 8))
        stats = ob.stats().lanes[Lane.DIAGNOSTICS]
        assert stats.queued == 5
        assert stats.dropped == {"budget": 4}
        assert [r.topic for r in drain(ob)] == [f"t/{i:04d}" for i in range(5)]


def test_total_budget_takes_from_diagnostics_before_features(db: Path) -> None:
    with Outbox(db, budgets=UNBOUNDED, total_max_bytes=20 * SIZE) as ob:
        ob.put_many([item(Lane.FEATURES, i) for i in range(10)])
        ob.put_many([item(Lane.DIAGNOSTICS, 100 + i) for i in range(9)] + [item(Lane.FEATURES, 10)])
        stats = ob.stats()
        assert stats.total_bytes == 20 * SIZE
        assert stats.lanes[Lane.FEATURES].queued == 11  # diagnostics gave way first
        assert stats.lanes[Lane.DIAGNOSTICS].dropped == {}
        ob.put_many([item(Lane.DIAGNOSTICS, 109), item(Lane.DIAGNOSTICS, 110)])
        stats = ob.stats()
        assert stats.lanes[Lane.DIAGNOSTICS].queued == 9
        assert stats.lanes[Lane.DIAGNOSTICS].dropped == {"budget": 2}  # the newest were refused
        assert stats.lanes[Lane.FEATURES].dropped == {}
        ob.put_many([item(Lane.ALARMS, 200 + i) for i in range(3)])  # diagnostics have nothing incoming
        stats = ob.stats()
        assert stats.lanes[Lane.FEATURES].queued == 8
        assert stats.lanes[Lane.FEATURES].dropped == {"budget": 3}
        assert stats.total_bytes == 20 * SIZE


def test_drops_are_logged_as_state_changes(db: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    budgets = {**UNBOUNDED, Lane.FEATURES: LaneBudget(3 * SIZE, None, FullPolicy.DROP_OLDEST)}
    with Outbox(db, budgets=budgets) as ob:
        ob.put_many([item(Lane.FEATURES, i) for i in range(3)])
        for i in range(3, 7):
            ob.put(item(Lane.FEATURES, i))
        ob.ack([r.id for r in ob.lease(3)])
        ob.put(item(Lane.FEATURES, 7))
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if "lane features" in r.getMessage()]
    assert [level for level, _ in lines] == [
        logging.WARNING,
        logging.DEBUG,
        logging.DEBUG,
        logging.DEBUG,
        logging.INFO,
    ]
    assert "4 dropped in all" in lines[-1][1]


def test_age_budget_drops_old_unleased_records_and_counts(db: Path) -> None:
    budgets = {**UNBOUNDED, Lane.FEATURES: LaneBudget(None, 100.0, FullPolicy.DROP_OLDEST)}
    with Outbox(db, budgets=budgets) as ob:
        ob.put_many([item(Lane.ALARMS, 0, t_wall=NOW - 10_000)])  # alarms never age out
        ob.put_many([item(Lane.FEATURES, i, t_wall=NOW - 200 + i) for i in range(5)])
        ob.put_many([item(Lane.FEATURES, i, t_wall=NOW - 50) for i in range(5, 8)])
        leased = ob.lease(2)  # the alarm and the oldest feature: in flight, kept
        assert ob.expire(NOW) == 4
        assert ob.expire(NOW) == 0
        stats = ob.stats()
        assert stats.lanes[Lane.FEATURES].dropped == {"age": 4}
        assert stats.lanes[Lane.FEATURES].queued == 4
        assert stats.lanes[Lane.ALARMS].queued == 1
        ob.release([r.id for r in leased])
        assert [r.topic for r in drain(ob)] == ["t/0000", "t/0000", "t/0005", "t/0006", "t/0007"]


def test_age_budget_spares_records_stamped_before_the_clock_was_set(db: Path) -> None:
    budgets = {**UNBOUNDED, Lane.FEATURES: LaneBudget(None, 100.0, FullPolicy.DROP_OLDEST)}
    with Outbox(db, budgets=budgets) as ob:
        ob.put_many([item(Lane.FEATURES, 0, t_wall=12.0), item(Lane.FEATURES, 1, t_wall=NOW - 500)])
        assert ob.expire(NOW) == 1
        assert [r.topic for r in drain(ob)] == ["t/0000"]


def test_drop_counters_survive_reopen(db: Path) -> None:
    budgets = {
        Lane.ALARMS: LaneBudget(None, None, FullPolicy.NEVER_DROP),
        Lane.FEATURES: LaneBudget(2 * SIZE, 10.0, FullPolicy.DROP_OLDEST),
        Lane.DIAGNOSTICS: LaneBudget(1 * SIZE, None, FullPolicy.DROP_NEWEST),
    }
    with Outbox(db, budgets=budgets) as ob:
        ob.put_many([item(Lane.FEATURES, i, t_wall=NOW - 100) for i in range(5)])
        ob.put_many([item(Lane.DIAGNOSTICS, i) for i in range(3)])
        assert ob.expire(NOW) == 2
    with Outbox(db, budgets=budgets) as ob:
        dropped = ob.stats().dropped
    assert dropped[Lane.FEATURES] == {"budget": 3, "age": 2}
    assert dropped[Lane.DIAGNOSTICS] == {"budget": 2}
    assert dropped[Lane.ALARMS] == {}


def test_budgets_that_would_drop_alarms_are_refused(db: Path) -> None:
    with pytest.raises(ConfigError, match="alarms are never dropped"):
        Outbox(db, budgets={Lane.ALARMS: LaneBudget(100, None, FullPolicy.DROP_OLDEST)})
    with pytest.raises(ConfigError, match="NEVER_DROP"):
        Outbox(db, budgets={Lane.FEATURES: LaneBudget(100, None, FullPolicy.NEVER_DROP)})
    assert not db.exists()


def test_acked_space_is_given_back_to_the_filesystem(db: Path) -> None:
    with Outbox(db, synchronous="NORMAL") as ob:
        for b in range(40):
            ob.put_many([item(Lane.FEATURES, b * 100 + i, size=1000) for i in range(100)])
        peak = db.stat().st_size + Path(f"{db}-wal").stat().st_size
        while batch := ob.lease(500):
            ob.ack([r.id for r in batch])
    assert peak > 4_000_000
    assert db.stat().st_size < peak / 2


# --- crashes ---------------------------------------------------------------------------------------

CHILD_LEASE_THEN_WAIT = """
import sys, time
from pathlib import Path
from gateway.contracts import Lane
from gateway.outbox import OutItem, Outbox
path, n, batch = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
ob = Outbox(path)
for start in range(0, n, batch):
    ob.put_many([OutItem(Lane(i % 3), f"t/{i}", i.to_bytes(4, "big") * 30, 1.7e9 + i)
                 for i in range(start, min(n, start + batch))])
leased = ob.lease(n // 2)
print("ready", len(leased), flush=True)
time.sleep(60)
"""

CHILD_PUT_FOREVER = """
import sys
from pathlib import Path
from gateway.contracts import Lane
from gateway.outbox import OutItem, Outbox
path, batch = Path(sys.argv[1]), int(sys.argv[2])
ob = Outbox(path)
i = 0
while True:
    ob.put_many([OutItem(Lane.FEATURES, f"t/{k}", k.to_bytes(4, "big") * 30, 1.7e9 + k)
                 for k in range(i, i + batch)])
    i += batch
    print(i, flush=True)
"""


def spawn(code: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )


def kill(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    assert proc.stdout is not None
    proc.stdout.close()


@pytest.mark.slow
def test_sigkill_between_put_and_ack_loses_nothing(db: Path) -> None:
    n = 3000
    proc = spawn(CHILD_LEASE_THEN_WAIT, str(db), str(n), "100")
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
    finally:
        kill(proc)
    assert line.split() == ["ready", str(n // 2)]
    assert Path(f"{db}-wal").exists()  # the records lived in the log, not yet checkpointed
    with Outbox(db) as ob:
        assert ob.stats().recovered_from == ()  # a crash is not corruption
        leased = drain(ob)
    assert sorted(int.from_bytes(r.payload[:4], "big") for r in leased) == list(range(n))
    for r in leased:
        i = int.from_bytes(r.payload[:4], "big")
        assert (r.lane, r.topic, r.payload, r.t_wall) == (
            Lane(i % 3),
            f"t/{i}",
            i.to_bytes(4, "big") * 30,
            1.7e9 + i,
        )
    # Leasing writes nothing (it must work on a full disk): attempts start over after a restart.
    assert [r.attempts for r in leased] == [0] * n


@pytest.mark.slow
def test_sigkill_while_putting_keeps_every_committed_batch(db: Path) -> None:
    batch = 50
    proc = spawn(CHILD_PUT_FOREVER, str(db), str(batch))
    try:
        assert proc.stdout is not None
        committed = 0
        while committed < 1500:
            committed = int(proc.stdout.readline())
    finally:
        kill(proc)
    with Outbox(db) as ob:
        leased = drain(ob)
    numbers = [int.from_bytes(r.payload[:4], "big") for r in leased]
    assert len(numbers) >= committed
    assert len(numbers) % batch == 0  # whole batches or nothing
    assert numbers == list(range(len(numbers)))


# --- corruption and unusable paths -------------------------------------------------------------------


def set_aside_files(db: Path) -> list[Path]:
    return sorted(p for p in db.parent.iterdir() if ".corrupt-" in p.name)


def assert_recovered(ob: Outbox, db: Path, caplog: pytest.LogCaptureFixture, *, expect: Path) -> None:
    stats = ob.stats()
    assert stats.recovered_from == (expect,)
    assert expect.exists()
    critical = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
    assert len(critical) == 2  # the file set aside, then the new epoch and what it lost
    assert str(db) in critical[0]
    assert str(expect) in critical[0]
    assert "not delivered" in critical[0]
    assert f"new epoch {ob.epoch}" in critical[1]
    assert len(stats.losses) == 1
    assert stats.losses[-1].epoch == ob.epoch
    ob.put(item(Lane.ALARMS, 7))  # the fresh database works
    assert item(Lane.ALARMS, 7).payload in [r.payload for r in drain(ob)]


def test_a_file_of_random_bytes_is_set_aside(db: Path, caplog: pytest.LogCaptureFixture) -> None:
    db.parent.mkdir(parents=True)
    garbage = os.urandom(64 * 1024)
    db.write_bytes(garbage)
    with Outbox(db) as ob:
        (aside,) = set_aside_files(db)
        assert aside.read_bytes() == garbage
        assert ob.stats().queued == 0
        assert_recovered(ob, db, caplog, expect=aside)


def test_a_database_with_overwritten_pages_is_set_aside(db: Path, caplog: pytest.LogCaptureFixture) -> None:
    with Outbox(db) as ob:
        ob.put_many([item(Lane.FEATURES, i, size=300) for i in range(3000)])
    size = db.stat().st_size
    with db.open("r+b") as f:
        f.seek(size // 2)
        f.write(os.urandom(16 * 1024))
    with Outbox(db) as ob:
        (aside,) = set_aside_files(db)
        assert aside.stat().st_size == size
        assert ob.stats().queued == 0
        assert_recovered(ob, db, caplog, expect=aside)
    inspect = sqlite3.connect(aside)  # still there to look at, as the log line says
    try:
        found = str(inspect.execute("PRAGMA quick_check").fetchone()[0])
    except sqlite3.DatabaseError as exc:
        found = str(exc)
    finally:
        inspect.close()
    assert found != "ok"


def test_a_garbage_log_is_set_aside_and_the_database_kept(db: Path, caplog: pytest.LogCaptureFixture) -> None:
    with Outbox(db) as ob:
        ob.put_many([item(Lane.FEATURES, i) for i in range(20)])
    wal = Path(f"{db}-wal")
    assert not wal.exists()  # a clean close checkpoints the log into the database
    wal.write_bytes(os.urandom(8192))
    with Outbox(db) as ob:
        (aside,) = set_aside_files(db)
        assert aside.name.startswith("outbox.db-wal.corrupt-")
        assert ob.stats().queued == 20  # everything checkpointed is still there
        assert_recovered(ob, db, caplog, expect=aside)


def test_an_empty_database_with_a_garbage_log_starts_fresh(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db.parent.mkdir(parents=True)
    db.write_bytes(b"")
    Path(f"{db}-wal").write_bytes(b"\x00" * 4096)  # what a power cut can leave behind
    with Outbox(db) as ob:
        (aside,) = set_aside_files(db)
        assert_recovered(ob, db, caplog, expect=aside)


def test_a_zero_length_log_is_normal(db: Path, caplog: pytest.LogCaptureFixture) -> None:
    with Outbox(db) as ob:
        ob.put_many([item(Lane.FEATURES, i) for i in range(5)])
    Path(f"{db}-wal").write_bytes(b"")
    with Outbox(db) as ob:
        assert ob.stats().queued == 5
        assert ob.stats().recovered_from == ()
    assert set_aside_files(db) == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_foreign_sqlite_database_is_set_aside(db: Path, caplog: pytest.LogCaptureFixture) -> None:
    db.parent.mkdir(parents=True)
    with sqlite3.connect(db) as other:
        other.execute("CREATE TABLE something_else (x)")
    other.close()
    with Outbox(db) as ob:
        (aside,) = set_aside_files(db)
        assert_recovered(ob, db, caplog, expect=aside)
    assert "not an outbox database" in caplog.text


def big_outbox_corrupted_behind_its_back(db: Path, at: int) -> Outbox:
    """An open outbox whose file is overwritten at ``at`` (bigger than SQLite's page cache)."""
    with Outbox(db) as ob:
        ob.put_many([item(Lane.FEATURES, i, size=1000) for i in range(6000)])
    ob = Outbox(db)
    with db.open("r+b") as f:
        f.seek(at if at >= 0 else db.stat().st_size // 3)
        f.write(os.urandom(64 * 1024))
    return ob


def test_corruption_found_by_lease_recovers_once(db: Path, caplog: pytest.LogCaptureFixture) -> None:
    with big_outbox_corrupted_behind_its_back(db, -1) as ob:
        assert ob.lease(10_000) == []  # the fresh database is empty
        (aside,) = set_aside_files(db)
        assert ob.stats().dropped[Lane.FEATURES] == {"corrupt": 6000}  # what was queued in the old file
        assert_recovered(ob, db, caplog, expect=aside)
    with Outbox(db) as ob:
        assert ob.stats().dropped[Lane.FEATURES] == {"corrupt": 6000}


def test_ids_after_recovery_start_above_the_old_ones(db: Path) -> None:
    # A lease handed out before the corruption may still be acked later: its id must not name a
    # record of the fresh file.
    with Outbox(db) as ob:
        ob.put_many([item(Lane.FEATURES, i, size=1000) for i in range(6000)])
    ob = Outbox(db)
    try:
        handed_out = ob.lease(10)  # still with the uplink when the file turns out corrupt
        with db.open("r+b") as f:
            f.seek(db.stat().st_size // 3)
            f.write(os.urandom(64 * 1024))
        assert ob.lease(10_000) == []  # reads the damaged pages: a fresh, empty database
        assert set_aside_files(db)
        ob.put_many([item(Lane.ALARMS, i) for i in range(5)])
        fresh = ob.lease(100)
        assert fresh
        assert min(r.id for r in fresh) > max(r.id for r in handed_out)
        ob.ack([r.id for r in handed_out])  # the late ack deletes nothing of the fresh file
        assert len(ob.lease(100)) == 0
        ob.release([r.id for r in fresh])
        assert len(ob.lease(100)) == len(fresh)
    finally:
        ob.close()


def test_corruption_found_by_put_keeps_the_batch_or_counts_it(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with big_outbox_corrupted_behind_its_back(db, 4096) as ob:
        batch = [item(Lane.ALARMS, i) for i in range(10)]
        ob.put_many(batch)
        stats = ob.stats()  # if the put landed in SQLite's cache unnoticed, this finds the damage
        (aside,) = set_aside_files(db)
        kept = [r.payload for r in ob.lease(100)]
        # Either the put found the damage and went to the fresh file, or it is counted as lost.
        assert kept in ([i.payload for i in batch], [])
        assert len(kept) + stats.dropped[Lane.ALARMS].get("corrupt", 0) == len(batch)
        assert_recovered(ob, db, caplog, expect=aside)


def test_an_unusable_directory_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"cannot create the directory .*not-a-directory"):
        Outbox(blocker / "outbox.db")
    with pytest.raises(ConfigError, match="is a directory"):
        Outbox(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")
def test_a_read_only_directory_is_a_config_error(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    try:
        with pytest.raises(ConfigError, match="cannot write to the directory"):
            Outbox(ro / "outbox.db")
    finally:
        ro.chmod(0o700)


def test_use_after_close_raises(db: Path) -> None:
    ob = Outbox(db)
    ob.close()
    ob.close()
    with pytest.raises(RuntimeError, match="after close"):
        ob.put(item(Lane.ALARMS, 0))


# --- AsyncOutbox -----------------------------------------------------------------------------------


def test_async_submit_then_flush_is_durable(db: Path) -> None:
    async def main() -> None:
        async with AsyncOutbox(lambda: Outbox(db), flush_interval_s=60) as ao:
            for i in range(20):
                ao.submit(item(Lane.FEATURES, i))
            assert ao.pending == 20
            await ao.flush()
            assert ao.pending == 0
            with Outbox(db) as other:  # a second connection sees it committed
                assert other.stats().queued == 20

    asyncio.run(main())


def test_async_exit_flushes_what_is_pending(db: Path) -> None:
    async def main() -> None:
        async with AsyncOutbox(lambda: Outbox(db), flush_interval_s=60) as ao:
            for i in range(50):
                ao.submit(item(Lane.ALARMS, i))
        with pytest.raises(RuntimeError):
            ao.submit(item(Lane.ALARMS, 99))

    asyncio.run(main())
    with Outbox(db) as ob:
        assert [r.topic for r in drain(ob)] == [f"t/{i:04d}" for i in range(50)]


def test_async_flusher_commits_on_its_own(db: Path) -> None:
    async def main() -> None:
        async with AsyncOutbox(lambda: Outbox(db), flush_interval_s=0.02, flush_batch=10_000) as ao:
            beat = ao.last_beat
            ao.submit(item(Lane.FEATURES, 0))
            for _ in range(200):
                await asyncio.sleep(0.01)
                if ao.pending == 0 and ao.last_beat > beat:
                    break
            assert ao.pending == 0
            assert ao.last_beat > beat
            assert (await ao.stats()).queued == 1

    asyncio.run(main())


def test_async_a_full_batch_wakes_the_flusher(db: Path) -> None:
    async def main() -> None:
        async with AsyncOutbox(lambda: Outbox(db), flush_interval_s=60, flush_batch=10) as ao:
            for i in range(10):
                ao.submit(item(Lane.FEATURES, i))
            for _ in range(200):
                await asyncio.sleep(0.01)
                if ao.pending == 0:
                    break
            assert (await ao.stats()).queued == 10

    asyncio.run(main())


def test_async_lease_ack_release(db: Path) -> None:
    async def main() -> None:
        async with AsyncOutbox(lambda: Outbox(db)) as ao:
            for i in range(6):
                ao.submit(item(Lane(i % 3), i))
            await ao.flush()
            first = await ao.lease(4)
            assert [r.lane for r in first] == [Lane.ALARMS, Lane.ALARMS, Lane.FEATURES, Lane.FEATURES]
            await ao.ack([r.id for r in first[:2]])
            await ao.release([r.id for r in first[2:]])
            rest = await ao.lease(10)
            assert [r.topic for r in rest] == ["t/0001", "t/0004", "t/0002", "t/0005"]
            stats = await ao.stats()
            assert stats.queued == 4
            assert stats.lanes[Lane.FEATURES].leased == 2

    asyncio.run(main())


def test_async_exit_still_flushes_when_cancelled(db: Path) -> None:
    async def main() -> None:
        ao = AsyncOutbox(lambda: Outbox(db), flush_interval_s=60)
        await ao.__aenter__()
        for i in range(100):
            ao.submit(item(Lane.FEATURES, i))
        closing = asyncio.create_task(ao.__aexit__(None, None, None), name="close-outbox")
        await asyncio.sleep(0)
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing

    asyncio.run(main())
    with Outbox(db) as ob:
        assert ob.stats().queued == 100


def test_async_refuses_non_alarms_when_pending_bytes_are_full(db: Path) -> None:
    size = record_size(item(Lane.FEATURES, 0))
    bound = 3 * size

    async def main() -> None:
        async with AsyncOutbox(lambda: Outbox(db), flush_interval_s=60, max_pending_bytes=bound) as ao:
            for i in range(5):
                ao.submit(item(Lane.FEATURES, i))
            ao.submit(item(Lane.ALARMS, 9))  # alarms may go past the bound (up to twice it)
            assert ao.pending == 4
            assert ao.pending_bytes == 3 * size + record_size(item(Lane.ALARMS, 9))
            assert ao.drop_counts() == {"features": {"queue_full": 2}}
            assert ao.dropped_total() == 2

    asyncio.run(main())
    with Outbox(db) as ob:
        assert [r.topic for r in drain(ob)] == ["t/0009", "t/0000", "t/0001", "t/0002"]
        # The refusals were written with the next commit: persisted like every other drop.
        assert ob.stats().dropped[Lane.FEATURES] == {"queue_full": 2}


def test_async_applies_age_budgets_on_its_own(db: Path) -> None:
    budgets = {**UNBOUNDED, Lane.FEATURES: LaneBudget(None, 60.0, FullPolicy.DROP_OLDEST)}
    now = time.time()

    def factory() -> Outbox:
        return Outbox(db, budgets=budgets)

    async def main() -> None:
        async with AsyncOutbox(factory, flush_interval_s=0.01, expire_interval_s=0.01) as ao:
            ao.submit(item(Lane.FEATURES, 0, t_wall=now - 120))
            ao.submit(item(Lane.FEATURES, 1, t_wall=now))
            for _ in range(200):
                await asyncio.sleep(0.01)
                stats = await ao.stats()
                if stats.dropped_total:
                    break
            assert stats.lanes[Lane.FEATURES].dropped == {"age": 1}
            assert [r.topic for r in await ao.lease(10)] == ["t/0001"]

    asyncio.run(main())


def test_async_open_errors_propagate(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")

    async def main() -> None:
        async with AsyncOutbox(lambda: Outbox(blocker / "outbox.db")):
            pytest.fail("opened an outbox under a file")

    with pytest.raises(ConfigError):
        asyncio.run(main())


# --- sequence support for the uplink: epoch, id ranges, commit notification ------------------------


def test_epoch_is_kept_across_reopen_and_new_after_corruption(db: Path) -> None:
    with Outbox(db) as ob:
        epoch = ob.epoch
        ob.put_many([item(Lane.FEATURES, i) for i in range(3)])
    assert epoch > 0
    with Outbox(db) as ob:
        assert ob.epoch == epoch
        assert ob.last_id() == 3
    db.write_bytes(os.urandom(8192))
    with Outbox(db) as ob:
        assert ob.epoch not in (0, epoch)  # a fresh database: the sequence goes on in a new epoch
        assert ob.last_id() >= 3  # above every id ever handed out (the floor in the state file)
        assert ob.stats().losses[-1].prev_epoch == epoch


def test_a_database_without_an_epoch_gets_one_that_sticks(db: Path) -> None:
    with Outbox(db) as ob:
        ob.put(item(Lane.FEATURES, 0))
    conn = sqlite3.connect(db)
    conn.execute("DELETE FROM meta WHERE key = 'epoch'")
    conn.commit()
    conn.close()
    Path(f"{db}.state").unlink()  # as written by a version without epochs nor a state file
    with Outbox(db) as ob:
        first = ob.epoch
        assert first > 0
    with Outbox(db) as ob:
        assert ob.epoch == first
        assert len(drain(ob)) == 1


def test_lease_by_id_range_serves_live_before_backlog(ob: Outbox) -> None:
    ob.put_many([item(Lane.FEATURES, i) for i in range(5)] + [item(Lane.ALARMS, 5)])
    boundary = ob.last_id()
    ob.put_many([item(Lane.FEATURES, 6), item(Lane.ALARMS, 7)])
    live = ob.lease(10, after_id=boundary)
    assert [r.topic for r in live] == ["t/0007", "t/0006"]  # alarms first inside the range too
    backlog = ob.lease(3, through_id=boundary)
    assert [r.topic for r in backlog] == ["t/0005", "t/0000", "t/0001"]
    assert ob.lease(10, after_id=boundary) == []
    assert [r.topic for r in ob.lease(10, through_id=boundary)] == ["t/0002", "t/0003", "t/0004"]
    assert ob.lease(10, after_id=3, through_id=3) == []


def test_async_alarm_is_committed_without_waiting_for_the_interval(db: Path) -> None:
    async def main() -> float:
        async with AsyncOutbox(lambda: Outbox(db), flush_interval_s=60) as ao:
            assert not await ao.wait_committed(0.01)
            ao.submit(item(Lane.FEATURES, 0))
            assert not await ao.wait_committed(0.1)  # features wait for the interval or a full batch
            start = time.monotonic()
            ao.submit(item(Lane.ALARMS, 1))
            assert await ao.wait_committed(5.0)
            took = time.monotonic() - start
            assert [r.topic for r in await ao.lease(10)] == ["t/0001", "t/0000"]
            return took

    assert asyncio.run(main()) < 1.0


# --- alarms leased by their own commit -------------------------------------------------------------


def test_put_many_leases_its_alarms_in_the_same_hold(ob: Outbox) -> None:
    handed = ob.put_many(
        [item(Lane.FEATURES, 0), item(Lane.ALARMS, 1), item(Lane.ALARMS, 2)], lease_alarms=True
    )
    assert [(r.topic, r.attempts) for r in handed] == [("t/0001", 0), ("t/0002", 0)]
    assert [r.topic for r in drain(ob)] == ["t/0000"]  # leased already: not handed out twice
    assert ob.put_many([item(Lane.FEATURES, 3)], lease_alarms=True) == []  # no alarm, nothing leased
    ob.release([r.id for r in handed])
    # Released, they go back to the queue as any lease's records do.
    assert [(r.topic, r.attempts) for r in drain(ob)] == [("t/0001", 1), ("t/0002", 1), ("t/0003", 0)]


def test_put_many_hands_no_alarm_over_while_an_older_one_waits(ob: Outbox) -> None:
    ob.put_many([item(Lane.ALARMS, 0)])  # committed with no one to take it: for a lease
    assert ob.put_many([item(Lane.ALARMS, 1)], lease_alarms=True) == []
    # A lease then hands both out, in order; the next commit's alarm is handed over again.
    assert [r.topic for r in ob.lease(10)] == ["t/0000", "t/0001"]
    assert [r.topic for r in ob.put_many([item(Lane.ALARMS, 2)], lease_alarms=True)] == ["t/0002"]
    # An alarm handed back (a refused publish, a lost connection) is older again than the next one.
    assert ob.lease(10) == []
    ob.release([ob.last_id()])
    assert ob.put_many([item(Lane.ALARMS, 3)], lease_alarms=True) == []
    assert [r.topic for r in ob.lease(10)] == ["t/0002", "t/0003"]


def test_async_hands_committed_alarms_over_and_loses_none_on_a_failed_commit(db: Path) -> None:
    async def main() -> None:
        async with AsyncOutbox(lambda: Outbox(db), flush_interval_s=0.02) as ao:
            handed: list[list[str]] = []
            ao.hand_alarms_to(lambda got: handed.append([r.topic for r in got]))
            # Another writer holds the database: the commit fails after the busy timeout.
            other = sqlite3.connect(db, isolation_level=None, timeout=0)
            other.execute("BEGIN IMMEDIATE")
            ao.submit(item(Lane.FEATURES, 0))
            ao.submit(item(Lane.ALARMS, 1))
            ao.submit(item(Lane.ALARMS, 2))
            deadline = time.monotonic() + 15
            while ao.health() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert "cannot write" in str(ao.health())
            assert handed == []  # nothing is handed over before its commit
            assert ao.pending == 3
            other.execute("ROLLBACK")
            other.close()
            await ao.flush()
            assert handed == [["t/0001", "t/0002"]]  # after the commit that did go through, in order
            assert [r.topic for r in await ao.lease(10)] == ["t/0000"]  # the rest is for a lease
            # No taker: the next alarm is for a lease, as before.
            ao.hand_alarms_to(None)
            ao.submit(item(Lane.ALARMS, 3))
            await ao.flush()
            assert handed == [["t/0001", "t/0002"]]
            assert [r.topic for r in await ao.lease(10)] == ["t/0003"]

    asyncio.run(main())
