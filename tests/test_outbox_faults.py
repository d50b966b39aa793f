"""Outbox faults: damaged logs and databases end in a new epoch with the loss counted; full disks degrade.

Each damage is made to real files left by a real process killed with SIGKILL (so its
write-ahead log still holds committed transactions); the full disk is a small tmpfs mounted by
the test itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.anonymize import Anonymizer, Pseudonymizer
from gateway.contracts import Diagnostic, Lane
from gateway.outbox import AsyncOutbox, DropReason, Outbox, OutItem
from gateway.outbox.recovery import scan_wal
from gateway.outbox.state import StateFile

REPO = Path(__file__).resolve().parents[1]
NOW = 1_760_000_000.0

# Puts n records in batches, delivers the first `acked`, reports and waits to be killed: its log
# keeps every transaction, its state file the numbers as of the last one.
CHILD = """
import sys, time
from pathlib import Path
from gateway.contracts import Lane
from gateway.outbox import OutItem, Outbox
path, n, acked = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
ob = Outbox(path, reserve_bytes=0)
for start in range(0, n, 20):
    ob.put_many([OutItem(Lane(i % 3), f"t/{i}", i.to_bytes(4, "big") * 250, 1.76e9)
                 for i in range(start, min(n, start + 20))])
ob.ack([r.id for r in ob.lease(acked)])
lanes = ob.stats().lanes
print("ready", ob.epoch, ob.last_id(), *(lanes[lane].queued for lane in Lane), flush=True)
time.sleep(60)
"""


def assert_leaves_the_gateway(counters: dict[str, float | str]) -> None:
    """The counters diagnostic passes the anonymizer whole: a refused one would hide the loss."""
    anon = Anonymizer(Pseudonymizer(b"o" * 32), time_mode="relative", start_wall=1.7e9)
    anon.diagnostic(Diagnostic("counters", None, 1.7e9, counters))  # raises when refused


def killed_writer(db: Path, n: int = 600, acked: int = 100) -> tuple[int, int, dict[Lane, int]]:
    """Run CHILD, SIGKILL it; return its epoch, last id and queued records by lane."""
    db.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(db), str(n), str(acked)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert line[0] == "ready", line
    return int(line[1]), int(line[2]), {lane: int(n) for lane, n in zip(Lane, line[3:], strict=True)}


def lost_from(before: dict[Lane, int], ob: Outbox) -> int:
    """Records of each lane that were queued before and are not now (resurrected ones excepted)."""
    lanes = ob.stats().lanes
    return sum(max(0, n - lanes[lane].queued) for lane, n in before.items())


def check_new_epoch(ob: Outbox, old_epoch: int, old_last: int, lost: int) -> None:
    """The loss is visible: a new epoch, ids above the old ones, the count in the drop counters."""
    stats = ob.stats()
    assert ob.epoch not in (0, old_epoch)
    assert stats.losses, "no loss event recorded"
    event = stats.losses[-1]
    assert (event.prev_epoch, event.epoch, event.last_id) == (old_epoch, ob.epoch, old_last)
    assert sum(event.lost.values()) == lost
    assert sum(r.get("corrupt", 0) for r in stats.dropped.values()) == lost
    assert sum(n.get("corrupt", 0) for n in ob.drop_counts().values()) == lost
    ob.put(OutItem(Lane.ALARMS, "t/new", b"new", NOW))
    ids = sorted(r.id for r in ob.lease(100_000))
    assert ids[0] > old_last  # never an id the old epoch used
    # Survivors numbered anew, then the new record: one unbroken sequence (no false gap at the twin).
    assert ids == list(range(ids[0], ids[0] + len(ids)))


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "outbox.db"


def test_garbage_frames_in_the_middle_of_the_log_start_a_new_epoch(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    epoch, last, queued = killed_writer(db)
    wal = Path(f"{db}-wal")
    scan = scan_wal(wal)
    assert scan is not None
    assert scan.broken_at is None
    page = (wal.stat().st_size - 32) // scan.frames if scan.frames else 4096 + 24
    with wal.open("r+b") as f:  # garbage over one frame half-way: SQLite would stop there silently
        f.seek(32 + (scan.frames // 2) * page + 100)
        f.write(os.urandom(512))
    with Outbox(db) as ob:
        lost = lost_from(queued, ob)
        assert lost > 0
        check_new_epoch(ob, epoch, last, lost)
    assert any("write-ahead log damaged at frame" in r.getMessage() for r in caplog.records)
    assert list(db.parent.glob("outbox.db-wal.corrupt-*")), "a copy of the damaged log is kept"


def test_a_log_with_a_garbage_header_is_set_aside_into_a_new_epoch(db: Path) -> None:
    epoch, last, queued = killed_writer(db)
    wal = Path(f"{db}-wal")
    with wal.open("r+b") as f:
        f.write(os.urandom(32))
    with Outbox(db) as ob:
        lost = lost_from(queued, ob)
        assert lost > 0
        check_new_epoch(ob, epoch, last, lost)

    async def diagnostics() -> dict[str, float | str]:
        async with AsyncOutbox(lambda: Outbox(db)) as ao:
            return ao.counters()

    counters = asyncio.run(diagnostics())
    assert sum(v for k, v in counters.items() if k.endswith("_corrupt") and isinstance(v, int)) == lost
    assert counters["outbox_last_loss_from_epoch"] == epoch
    assert counters["outbox_last_loss_up_to_id"] == last
    assert counters["outbox_last_loss_count"] == lost
    assert_leaves_the_gateway(counters)


def test_a_truncated_database_starts_a_new_epoch_with_its_records_counted(db: Path) -> None:
    epoch, last, queued = killed_writer(db)
    with Outbox(db, reserve_bytes=0):  # checkpoints the log into the file on close
        pass
    with db.open("r+b") as f:
        f.truncate(db.stat().st_size // 2)
    with Outbox(db) as ob:
        assert ob.stats().queued == 0
        check_new_epoch(ob, epoch, last, sum(queued.values()))


def test_an_overwritten_header_starts_a_new_epoch_with_its_records_counted(db: Path) -> None:
    epoch, last, queued = killed_writer(db)
    with Outbox(db, reserve_bytes=0):
        pass
    with db.open("r+b") as f:
        f.write(os.urandom(100))
    with Outbox(db) as ob:
        check_new_epoch(ob, epoch, last, sum(queued.values()))


def test_an_older_copy_put_back_is_a_new_epoch_not_reused_ids(db: Path) -> None:
    with Outbox(db) as ob:
        ob.put_many([OutItem(Lane.FEATURES, f"t/{i}", b"a" * 50, NOW) for i in range(10)])
    backup = db.with_name("backup.db")
    shutil.copyfile(db, backup)
    with Outbox(db) as ob:
        epoch = ob.epoch
        ob.put_many([OutItem(Lane.FEATURES, f"t/{i}", b"b" * 50, NOW) for i in range(10, 25)])
        last = ob.last_id()
    shutil.copyfile(backup, db)  # a restore from last week's backup
    with Outbox(db) as ob:
        check_new_epoch(ob, epoch, last, 15)


def test_drops_counted_on_the_loop_are_persisted_with_the_next_commit(db: Path) -> None:
    async def main() -> None:
        async with AsyncOutbox(lambda: Outbox(db), flush_interval_s=60) as ao:
            ao.count_drop(Lane.ALARMS, DropReason.OVERSIZE, 2)
            assert ao.drop_counts() == {"alarms": {"oversize": 2}}  # at once, before any commit
            await ao.flush()

    asyncio.run(main())
    with Outbox(db) as ob:
        assert ob.stats().dropped[Lane.ALARMS] == {"oversize": 2}


def test_drop_counters_outlive_the_database(db: Path) -> None:
    with Outbox(db) as ob:
        ob.count_drops({(Lane.FEATURES, DropReason.BUDGET): 7})
        before = ob.drop_counts()
    db.write_bytes(os.urandom(8192))
    with Outbox(db) as ob:
        assert ob.drop_counts()["features"]["budget"] == before["features"]["budget"] == 7


def test_a_torn_state_slot_falls_back_to_the_other(tmp_path: Path) -> None:
    state = StateFile(tmp_path / "x.state")
    state.save({"epoch": 1})
    state.save({"epoch": 2})
    with (tmp_path / "x.state").open("r+b") as f:  # the newer slot (generation 2 -> slot 0) torn
        f.write(b"\xff" * 40)
    assert StateFile(tmp_path / "x.state").load() == {"epoch": 1}


def test_dead_letters_leave_the_queue_but_stay_on_disk_counted(db: Path) -> None:
    with Outbox(db) as ob:
        ob.put_many([OutItem(Lane.ALARMS, f"t/{i}", b"y" * 10, NOW) for i in range(3)])
        leased = ob.lease(3)
        assert ob.dead_letter([leased[0].id, 999_999], "larger than the broker takes") == 1
        stats = ob.stats()
        assert stats.queued == 2
        assert stats.dead_letters == 1
        assert stats.dropped[Lane.ALARMS] == {"dead_letter": 1}
        assert ob.dead_letters() == [(leased[0].id, leased[0].topic, "larger than the broker takes")]
    with Outbox(db) as ob:  # kept across a restart
        assert ob.stats().dead_letters == 1
        assert [d[0] for d in ob.dead_letters()] == [leased[0].id]
    import sqlite3  # noqa: PLC0415 - the inspection a person would do

    conn = sqlite3.connect(db)
    try:
        assert conn.execute("SELECT id, reason FROM dead_letter").fetchall() == [
            (leased[0].id, "larger than the broker takes")
        ]
    finally:
        conn.close()


def test_release_never_waits_for_a_commit(db: Path) -> None:
    with Outbox(db) as ob:
        ob.put_many([OutItem(Lane.FEATURES, f"t/{i}", b"z", NOW) for i in range(5)])
        leased = ob.lease(5)
        held = threading.Event()
        done = threading.Event()

        def hold_lock() -> None:
            with ob._lock:  # what a commit's fsync does for its duration
                held.set()
                done.wait(5)

        t = threading.Thread(target=hold_lock)
        t.start()
        held.wait(5)
        start = time.monotonic()
        ob.release([r.id for r in leased])
        took = time.monotonic() - start
        done.set()
        t.join()
        assert took < 0.5
        assert len(ob.lease(5)) == 5  # the release was applied by the next call


# --- a full disk -----------------------------------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(tmp_path: Path, size_mb: int) -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / f"tmpfs-{os.getpid()}"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(directory: Path) -> Path:
    """Fill the filesystem to the last byte; return the filler file."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (b"\0" * 65536, b"\0" * 512):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, chunk)
    finally:
        os.close(fd)
    return filler


def test_full_disk_keeps_alarms_delivers_the_backlog_and_recovers(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path, 24) as mnt:
        path = mnt / "outbox.db"

        async def main() -> None:
            async with AsyncOutbox(
                lambda: Outbox(path, reserve_bytes=4 * 1024 * 1024), flush_interval_s=0.02
            ) as ao:
                for i in range(2000):
                    ao.submit(OutItem(Lane.FEATURES, f"f/{i}", os.urandom(1000), NOW))
                await ao.flush()
                filler = fill(mnt)
                beat = ao.last_beat
                features = 0
                while ao.health() is None and features < 50_000:  # until SQLite says full
                    ao.submit(OutItem(Lane.FEATURES, f"f/x{features}", os.urandom(1000), NOW))
                    features += 1
                    if features % 200 == 0:
                        await asyncio.sleep(0.03)
                assert "full" in str(ao.health())
                # The diagnostic says so too, in a form the anonymizer lets out.
                counters = ao.counters()
                assert (counters["outbox_degraded"], counters["outbox_degraded_why"]) == (1, "disk_full")
                assert_leaves_the_gateway(counters)
                for i in range(20):
                    ao.submit(OutItem(Lane.ALARMS, f"a/{i}", b"alarm" * 20, NOW))
                    ao.submit(OutItem(Lane.DIAGNOSTICS, f"d/{i}", b"diag" * 20, NOW))
                await asyncio.sleep(0.3)
                await ao.flush()
                assert ao.last_beat > beat  # the heartbeat goes on while degraded
                dropped = ao.drop_counts()
                assert dropped["diagnostics"]["disk_full"] == 20
                # The backlog is delivered while the disk is still full: leasing writes nothing.
                delivered = 0
                alarms = 0
                while batch := await ao.lease(500):
                    alarms += sum(1 for r in batch if r.lane is Lane.ALARMS)
                    await ao.ack([r.id for r in batch])
                    delivered += len(batch)
                assert alarms == 20
                assert delivered >= 2000
                filler.unlink()
                deadline = time.monotonic() + 10
                while ao.health() is not None and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                assert ao.health() is None  # recovered by itself
                ao.submit(OutItem(Lane.DIAGNOSTICS, "d/after", b"back", NOW))
                await ao.flush()
                assert [r.topic for r in await ao.lease(10)] == ["d/after"]

        asyncio.run(main())


def test_opening_on_a_full_disk_degrades_instead_of_failing(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path, 8) as mnt:
        path = mnt / "outbox.db"
        with Outbox(path, reserve_bytes=1024 * 1024) as ob:
            ob.put_many([OutItem(Lane.FEATURES, f"f/{i}", os.urandom(500), NOW) for i in range(500)])
        fill(mnt)  # a restart with the disk full to the last byte (the reserve still held)
        with Outbox(path, reserve_bytes=1024 * 1024) as ob:
            assert ob.degraded is not None
            assert ob.stats().queued == 500
            ob.ack([r.id for r in ob.lease(100)])  # delivering still works: it is what frees space
            assert ob.stats().queued == 400
        Path(f"{path}.reserve").unlink(missing_ok=True)
        fill(mnt)  # and with not a byte left at all: opening still works, for this process alone
        with Outbox(path, reserve_bytes=1024 * 1024) as ob:
            assert ob.degraded is not None
            assert ob.stats().queued == 400


def test_a_filesystem_too_small_for_the_reserve_is_named_as_such_not_as_a_full_disk(tmp_path: Path) -> None:
    # 2 MB in all, nearly all free: the default 4 MiB reserve can never be held here.
    with small_tmpfs(tmp_path, 2) as mnt, Outbox(mnt / "outbox.db") as ob:
        why = ob.degraded
    assert why is not None
    assert why.startswith(
        f"the filesystem of {mnt} holds 2097152 bytes in all, too few for the 4194304-byte reserve"
    )
    assert "disk is full" not in why


def test_an_open_that_fails_for_a_while_is_retried_not_crashed(db: Path) -> None:
    from gateway.errors import TransientError  # noqa: PLC0415

    attempts: list[float] = []

    def flaky() -> Outbox:  # an I/O error that clears (a disk coming back)
        attempts.append(time.monotonic())
        if len(attempts) < 3:
            raise TransientError(f"outbox {db}: open failed: disk I/O error: retried later")
        return Outbox(db)

    async def main() -> int:
        async with AsyncOutbox(flaky, open_retry_s=30.0) as ao:
            return ao.outbox.epoch

    assert asyncio.run(main()) > 0
    assert len(attempts) == 3

    def broken() -> Outbox:
        raise TransientError(f"outbox {db}: open failed: disk I/O error: retried later")

    async def gives_up() -> None:
        async with AsyncOutbox(broken, open_retry_s=1.0):
            pytest.fail("opened")

    start = time.monotonic()
    with pytest.raises(TransientError):
        asyncio.run(gives_up())
    assert time.monotonic() - start < 5.0
