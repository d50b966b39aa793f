"""Fault campaign, outbox side: a real ``edgetwin run`` against a real TLS mosquitto, counted by the twin.

Every scenario counts, with the twin's sequence check and the gateway's own reports (its retained
status topic, its drop counters), that no accepted record is lost without being reported:

* storage: a truncated database, an overwritten header, a garbage write-ahead log, garbage frames
  in the middle of the log - each ends in a new epoch with the loss counted and reported;
* disk: the state directory on a small tmpfs, filled to the last byte with the broker down, the
  broker back with the disk still full (the backlog drains), then space freed - no restart, every
  alarm delivered, WATCHDOG pings that never stop;
* process: SIGKILL 20 times at random moments while writing, and during replay.

Garbage frames in the middle of the log run by default; the rest is ``pytest -m campaign``.  With
``CAMPAIGN_REPORT=<file>`` each scenario appends its figures as a JSON line (for BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from peers import free_port
from uplink_support import listener, require_mosquitto

from gateway.outbox.recovery import scan_wal
from gateway.records import StatusRecord, as_map, decode_pack
from gateway.twin.listen import Listener
from gateway.uplink.broker import MosquittoBroker
from gateway.uplink.certs import DemoPKI, demo_pki

ROOT = Path(__file__).resolve().parents[1]


# --- the gateway process -----------------------------------------------------------------------------


def write_config(
    tmp: Path,
    state_dir: Path,
    broker: MosquittoBroker,
    pki: DemoPKI,
    *,
    sources: int = 3,
    port: int | None = None,
    name: str = "edgetwin.toml",
    replay_msgs_per_s: float = 5000.0,
) -> Path:
    """An edgetwin config: simulated patients with periodic sensor-off alarms, MQTT to ``broker``."""
    blocks = []
    for i in range(sources):
        offs = ", ".join(
            f'{{ kind = "sensor_off", at_s = {2.0 + 4.0 * k + i}, duration_s = 1.0 }}' for k in range(40)
        )
        blocks.append(
            f"""
[[sources]]
name = "bed{i}"
driver = "sim"
subject = "MRN-00{i}-CAMPAIGN"
profile = "patient"
device = "A4:C1:38:5B:20:{i:02X}"
rate_hz = 25.0
events = [{offs}]
"""
        )
    config = tmp / name
    config.write_text(
        f"""
[gateway]
name = "campaign-hub"
state_dir = "{state_dir}"

[pipeline]
window_s = 1.0
hop_s = 0.25
grace_s = 0.1
sensor_lost_s = 2.0

[runtime]
drain_deadline_s = 3.0
start_timeout_s = 10.0

[uplink]
kind = "mqtt"

[uplink.mqtt]
host = "{broker.host}"
port = {port or broker.port}
ca_file = "{pki.ca_file}"
cert_file = "{pki.gateway.cert}"
key_file = "{pki.gateway.key}"
reconnect_min_s = 0.2
reconnect_max_s = 0.5
connect_timeout_s = 3.0
replay_msgs_per_s = {replay_msgs_per_s}
replay_bytes_per_s = 50000000.0
"""
        + "".join(blocks)
    )
    return config


@dataclass
class Gateway:
    """One ``edgetwin run`` process; its stderr is collected in a thread."""

    proc: subprocess.Popen[str]
    err: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    @classmethod
    def start(cls, config: Path, env: dict[str, str] | None = None) -> Gateway:
        full = dict(os.environ, PYTHONPATH=str(ROOT))
        full.pop("NOTIFY_SOCKET", None)
        full.update(env or {})
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "run", "--config", str(config)],
            cwd=ROOT,
            env=full,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        gw = cls(proc)
        gw.reader = threading.Thread(target=gw._read, daemon=True)
        gw.reader.start()
        return gw

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.err.append(line)

    @property
    def log(self) -> str:
        return "".join(self.err)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        if self.reader is not None:
            self.reader.join(timeout=5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise


def committed(db: Path) -> tuple[set[int], int]:
    """Ids committed in an outbox database and its epoch, read by a second, read-only connection."""
    if not db.exists():
        return set(), 0
    for _ in range(20):
        try:
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
            try:
                ids = {int(row[0]) for row in conn.execute("SELECT id FROM records")}
                row = conn.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
                return ids, int(row[0]) if row else 0
            finally:
                conn.close()
        except sqlite3.OperationalError:
            time.sleep(0.1)
    return set(), 0


def last_seq(db: Path) -> int:
    """The highest record id an outbox database ever assigned (0 before its first record)."""
    if not db.exists():
        return 0
    for _ in range(20):
        try:
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
            try:
                row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'records'").fetchone()
                return int(row[0]) if row else 0
            finally:
                conn.close()
        except sqlite3.OperationalError:
            time.sleep(0.1)
    return 0


def signature(topic: str, record: Any) -> str:
    """A record's identity by content: its topic and decoded map."""
    return topic + " " + json.dumps(record, sort_keys=True, default=str)


def signatures(db: Path) -> Counter[str]:
    """The contents of every record queued in an outbox database (read-only)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return Counter(
            signature(t, as_map(decode_pack(p)[1]))
            for t, p in conn.execute("SELECT topic, payload FROM records")
        )
    finally:
        conn.close()


def wait(predicate: Callable[[], bool], timeout: float, what: str, gw: Gateway | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if gw is not None and gw.proc.poll() is not None:
            raise AssertionError(
                f"the gateway exited ({gw.proc.returncode}) waiting for {what}\n{gw.log[-3000:]}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout} s waiting for {what}\n{gw.log[-3000:] if gw else ''}"
            )
        time.sleep(0.1)


def delivered(twin: Listener) -> set[tuple[int, int]]:
    """(epoch, seq) of every record the twin received."""
    return {(m.epoch, m.seq) for m in twin.records() if m.epoch is not None and m.seq is not None}


def reported_dropped(twin: Listener) -> dict[str, int]:
    """The drop counters of the gateway's latest status message, by lane."""
    with twin._lock:
        statuses = [
            m.record
            for m in twin.messages
            if isinstance(m.record, StatusRecord) and m.record.state == "online"
        ]
    return dict(statuses[-1].dropped) if statuses else {}


def report(row: dict[str, Any]) -> None:
    """Append a scenario's figures for BENCHMARKS.md when CAMPAIGN_REPORT names a file."""
    target = os.environ.get("CAMPAIGN_REPORT")
    if target:
        with open(target, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DemoPKI:
    require_mosquitto()
    return demo_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def broker(tmp_path: Path, pki: DemoPKI) -> Iterator[MosquittoBroker]:
    b = MosquittoBroker(tmp_path / "broker", pki)
    yield b
    b.stop()


# --- storage ---------------------------------------------------------------------------------------------


def _damage_truncate(db: Path) -> None:
    with db.open("r+b") as f:
        f.truncate(db.stat().st_size // 2)


def _damage_header(db: Path) -> None:
    with db.open("r+b") as f:
        f.write(os.urandom(100))


def _damage_wal_header(db: Path) -> None:
    with Path(f"{db}-wal").open("r+b") as f:
        f.write(os.urandom(32))


def _damage_wal_frames(db: Path) -> None:
    wal = Path(f"{db}-wal")
    scan = scan_wal(wal)
    assert scan is not None
    assert scan.frames >= 4, scan
    frame = 24 + 4096
    with wal.open("r+b") as f:
        f.seek(32 + (scan.frames // 2) * frame + 200)
        f.write(os.urandom(1024))


STORAGE = {
    "truncated database": (_damage_truncate, False),
    "overwritten header": (_damage_header, False),
    "garbage write-ahead log": (_damage_wal_header, True),
    "garbage frames mid-log": (_damage_wal_frames, True),
}


def _run_storage(tmp_path: Path, broker: MosquittoBroker, pki: DemoPKI, scenario: str) -> None:
    damage, in_wal = STORAGE[scenario]
    state = tmp_path / "state"
    db = state / "outbox.db"
    config = write_config(tmp_path, state, broker, pki)

    def log_frames() -> int:
        scan = scan_wal(Path(f"{db}-wal"))
        return 0 if scan is None else scan.frames

    for _ in range(5):
        gw = Gateway.start(config)  # the broker is down: every record stays in the outbox
        try:
            wait(lambda: len(committed(db)[0]) >= 150, 60, "150 committed records", gw)
            if not in_wal:
                assert gw.stop() == 0, gw.log[-3000:]
                break
            # Killed, so that committed transactions are still in the log; enough of them.
            wait(lambda: log_frames() >= 12, 60, "a dozen frames in the log", gw)
            gw.kill()
        finally:
            gw.kill()
        if log_frames() >= 8:
            break  # (else a checkpoint restarted the log just before the kill: once more)
    accepted, old_epoch = committed(db)
    assert accepted

    contents = signatures(db)
    assert sum(contents.values()) == len(accepted)
    damage(db)

    broker.start()
    twin = listener(broker, pki)
    notify = NotifySocket(tmp_path / "notify.sock")
    gw = Gateway.start(config, {"NOTIFY_SOCKET": str(notify.path)})

    def arrived() -> int:
        """Accepted records the twin got (survivors are numbered anew: matched by content)."""
        received = Counter(
            signature(m.topic, as_map(m.record))
            for m in twin.records()
            if not isinstance(m.record, StatusRecord)
        )
        return sum((contents & received).values())

    try:
        t0 = time.monotonic()
        wait(lambda: any(e not in (None, old_epoch) for e, _ in delivered(twin)), 60, "a new epoch", gw)
        reconnect_s = time.monotonic() - t0
        # Everything the damaged outbox still had is delivered, and the status reports the rest.
        wait(
            lambda: arrived() + sum(reported_dropped(twin).values()) >= len(accepted), 60, "all accounted", gw
        )
        assert gw.stop() == 0, gw.log[-3000:]
    finally:
        gw.kill()
        twin.stop()
        notify.close()
    got = delivered(twin)
    epochs = {e for e, _ in got}
    assert old_epoch not in epochs
    assert len(epochs) == 1
    delivered_n = arrived()
    lost = len(accepted) - delivered_n
    reported = sum(reported_dropped(twin).values())
    assert lost > 0
    assert reported >= lost, f"{lost} lost, {reported} reported\n{gw.log[-3000:]}"
    assert min(s for _, s in got) > max(accepted)  # no id of the old epoch used again
    assert "new epoch" in gw.log
    # The systemd STATUS= line says so too, from the first one on (READY).
    status_drops = [int(m.group(1)) for st in notify.statuses() if (m := re.search(r"dropped (\d+)", st))]
    assert status_drops, notify.statuses()[:3]
    assert status_drops[0] >= lost
    report(
        {
            "scenario": f"storage: {scenario}",
            "accepted": len(accepted),
            "delivered": delivered_n,
            "reported_lost": reported,
            "lost": lost,
            "duplicates": len(twin.records()) - len(got),
            "reconnect_s": round(reconnect_s, 1),
        }
    )


def test_garbage_frames_mid_log_end_in_a_new_epoch_with_the_loss_reported(
    tmp_path: Path, broker: MosquittoBroker, pki: DemoPKI
) -> None:
    _run_storage(tmp_path, broker, pki, "garbage frames mid-log")


@pytest.mark.campaign
@pytest.mark.parametrize("scenario", ["truncated database", "overwritten header", "garbage write-ahead log"])
def test_storage_damage_ends_in_a_new_epoch_with_the_loss_reported(
    tmp_path: Path, broker: MosquittoBroker, pki: DemoPKI, scenario: str
) -> None:
    _run_storage(tmp_path, broker, pki, scenario)


# --- process ---------------------------------------------------------------------------------------------


@pytest.mark.campaign
def test_twenty_sigkills_while_writing_and_replaying_lose_nothing(
    tmp_path: Path, broker: MosquittoBroker, pki: DemoPKI
) -> None:
    rng = random.Random(1203)
    state = tmp_path / "state"
    db = state / "outbox.db"
    # Replay paced at 100 records/s, so that a kill a second or two after an outage lands in it.
    config = write_config(tmp_path, state, broker, pki, sources=6, replay_msgs_per_s=100.0)
    # The same gateway pointed at a port where nothing listens: an outage that builds a backlog
    # (the broker itself stays up: what it acknowledged must reach the twin).
    unreachable = write_config(tmp_path, state, broker, pki, sources=6, port=free_port(), name="down.toml")
    broker.start()
    twin = listener(broker, pki)
    accepted: set[int] = set()
    epochs: set[int] = set()
    try:
        for k in range(20):
            outage = k % 4 == 2  # a backlog builds up; the next run replays it and is killed meanwhile
            start_seq = last_seq(db)
            gw = Gateway.start(unreachable if outage else config)
            try:
                # Killed while writing: once this run has committed, at a random moment after.
                def wrote(since: int = start_seq) -> bool:
                    return last_seq(db) > since

                wait(wrote, 60, "this run's first commit", gw)
                time.sleep(rng.uniform(2.0, 5.0) if outage else rng.uniform(0.2, 3.0))
            finally:
                gw.kill()
            ids, epoch = committed(db)
            epochs.add(epoch)
            accepted |= ids  # what is still queued at the kill was accepted and must arrive
        seen_before = len(delivered(twin))
        gw = Gateway.start(config)
        try:
            t0 = time.monotonic()
            (epoch,) = epochs
            wait(lambda: accepted <= {s for e, s in delivered(twin) if e == epoch}, 120, "every record", gw)
            # Running (signal handlers in place) once records of this run arrive.
            wait(lambda: len(delivered(twin)) > seen_before + 10, 60, "live records", gw)
            drained_s = time.monotonic() - t0
            assert gw.stop() == 0, gw.log[-3000:]
        finally:
            gw.kill()
    finally:
        twin.stop()
    got = delivered(twin)
    seqs = sorted(s for _, s in got)
    holes = [(a, b) for a, b in itertools.pairwise(seqs) if b > a + 1]
    reported = sum(reported_dropped(twin).values())
    assert {e for e, _ in got} == epochs  # a crash is not a loss: one epoch throughout
    assert seqs[0] == 1  # from the very first record on
    missing = sum(b - a - 1 for a, b in holes)
    assert missing <= reported, f"{missing} ids never arrived, {reported} reported: {holes[:10]}"
    report(
        {
            "scenario": "process: 20 x SIGKILL while writing and replaying",
            "accepted": len(seqs),
            "delivered": len(got),
            "reported_lost": reported,
            "lost": missing,
            "duplicates": len(twin.records()) - len(got),
            "reconnect_s": round(drained_s, 1),
        }
    )


# --- disk ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(where: Path, size_mb: int) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = where / f"state-tmpfs-{os.getpid()}"
    mnt.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700", "tmpfs", str(mnt)], check=True
    )
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


class NotifySocket:
    """A NOTIFY_SOCKET as systemd offers it: every datagram kept with its arrival time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.received: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                data = self.sock.recv(8192)
                self.received.append((time.monotonic(), data.decode(errors="replace")))

    def statuses(self) -> list[str]:
        return [
            line[7:] for _, d in list(self.received) for line in d.splitlines() if line.startswith("STATUS=")
        ]

    def pings(self) -> list[float]:
        return [t for t, d in list(self.received) if "WATCHDOG=1" in d.splitlines()]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


def fill(directory: Path) -> Path:
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


@pytest.mark.campaign
def test_full_disk_degrades_delivers_the_backlog_and_recovers_without_a_restart(
    tmp_path: Path, broker: MosquittoBroker, pki: DemoPKI
) -> None:
    watchdog_s = 6.0
    with tmpfs(tmp_path, 40) as state:
        db = state / "outbox.db"
        config = write_config(tmp_path, state, broker, pki, sources=4)
        notify = NotifySocket(tmp_path / "notify.sock")
        env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": str(int(watchdog_s * 1e6))}
        gw = Gateway.start(config, env)
        twin: Listener | None = None
        try:
            wait(lambda: len(committed(db)[0]) >= 200, 60, "200 committed records", gw)
            filler = fill(state)
            wait(lambda: any("OUTBOX DEGRADED" in s for s in notify.statuses()), 60, "a degraded STATUS", gw)
            before = committed(db)[0]
            time.sleep(6.0)  # alarms keep coming while the disk is full
            broker.start()
            t0 = time.monotonic()
            twin = listener(broker, pki)
            wait(lambda: bool(delivered(twin)), 30, "the first delivery", gw)
            reconnect_s = time.monotonic() - t0
            # The backlog drains with the disk still full: delivering needs no new pages.
            wait(lambda: before <= {s for _, s in delivered(twin)}, 90, "the backlog", gw)
            assert filler.exists()
            filler.unlink()
            wait(lambda: "OUTBOX DEGRADED" not in (notify.statuses() or [""])[-1], 60, "recovery", gw)
            time.sleep(2.0)
            assert gw.proc.poll() is None  # no restart, ever
            assert gw.stop() == 0, gw.log[-3000:]
            ids, _ = committed(db)
        finally:
            gw.kill()
            notify.close()
            if twin is not None:
                twin.stop()
    assert twin is not None
    got = delivered(twin)
    seqs = sorted(s for _, s in got)
    holes = [(a, b) for a, b in itertools.pairwise(seqs) if b > a + 1]
    # Refused records never got an id: a hole would be a loss nothing reported.
    assert not [h for h in holes if not set(range(h[0] + 1, h[1])) <= ids], holes[:10]
    dropped = reported_dropped(twin)
    assert "alarms" not in dropped  # no alarm refused, so every alarm accepted was delivered
    alarms = [m for m in twin.records() if m.kind == "alarms"]
    assert alarms
    pings = notify.pings()
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert pings
    assert max(gaps) < watchdog_s, f"a WATCHDOG gap of {max(gaps):.1f} s"
    assert gw.log.count("the disk is full") >= 1
    report(
        {
            "scenario": "disk: tmpfs filled, broker back while full, then space freed",
            "accepted": len(seqs) + len(ids - set(seqs)),
            "delivered": len(got),
            "reported_lost": sum(dropped.values()),
            "lost": 0,
            "duplicates": len(twin.records()) - len(got),
            "reconnect_s": round(reconnect_s, 1),
            "alarms": len(alarms),
            "max_watchdog_gap_s": round(max(gaps), 2),
        }
    )
