"""RingBuffer: ordering, wrap-around, window reads, counters, against hand-made and brute-force answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import ConfigError, CorruptDataError
from gateway.pipeline.ring import RingBuffer, in_order


def cols(t: list[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows whose wall time, value and quality are derived from t_mono, so any row can be checked."""
    ta = np.asarray(t, np.float64)
    return ta, ta + 1000.0, ta * 2.0, (np.arange(ta.size) % 7).astype(np.uint8)


def test_append_keeps_rows_in_order_and_reports_bounds() -> None:
    r = RingBuffer(8)
    assert len(r) == 0
    assert r.last_t_mono == -math.inf
    assert r.first_t_mono == math.inf
    assert math.isnan(r.last_t_wall)
    for i in range(3):
        assert r.append(10.0 + i, 1e9 + i, float(i), i)
    assert len(r) == 3
    assert r.last_t_mono == 12.0
    assert r.first_t_mono == 10.0
    assert r.last_t_wall == 1e9 + 2
    t, tw, v, q = r.rows()
    assert t.tolist() == [10.0, 11.0, 12.0]
    assert tw.tolist() == [1e9, 1e9 + 1, 1e9 + 2]
    assert v.tolist() == [0.0, 1.0, 2.0]
    assert q.tolist() == [0, 1, 2]
    assert q.dtype == np.uint8


def test_append_drops_older_rows_and_nan_time_but_accepts_equal_time() -> None:
    r = RingBuffer(8)
    assert r.append(5.0, 0.0, 1.0, 0)
    assert not r.append(4.999, 0.0, 2.0, 0)
    assert not r.append(math.nan, 0.0, 3.0, 0)
    assert r.append(5.0, 0.0, 4.0, 0)  # same instant twice (two values per tick) is in order
    assert r.out_of_order == 2
    assert r.rows()[2].tolist() == [1.0, 4.0]


def test_append_accepts_integer_values() -> None:
    r = RingBuffer(4)
    assert r.append(1, 2, 3, 0)
    assert r.rows()[2].tolist() == [3.0]


def test_wrap_around_overwrites_oldest_and_counts() -> None:
    r = RingBuffer(5)
    for i in range(12):
        r.append(float(i), float(i) + 0.5, float(i) * 10, 0)
    assert len(r) == 5
    assert r.overwritten == 7
    assert r.rows()[0].tolist() == [7.0, 8.0, 9.0, 10.0, 11.0]
    assert r.first_t_mono == 7.0
    assert r.last_t_wall == 11.5


def test_between_across_the_wrap() -> None:
    r = RingBuffer(8)
    for i in range(12):  # rows 4..11 held; physical slots hold 8..11 then 4..7
        r.append(float(i), 0.0, float(i), 0)
    assert r.between(5.0, 10.0)[0].tolist() == [5.0, 6.0, 7.0, 8.0, 9.0]  # spans the wrap
    assert r.between(4.0, 6.0)[0].tolist() == [4.0, 5.0]  # older segment only
    assert r.between(9.0, 100.0)[0].tolist() == [9.0, 10.0, 11.0]  # newer segment only
    assert r.between(7.5, 8.0)[0].tolist() == []  # t1 is exclusive
    assert r.between(8.0, 8.5)[0].tolist() == [8.0]  # t0 is inclusive, first row after the wrap
    assert r.between(0.0, 4.0)[0].tolist() == []  # overwritten: nothing held
    assert r.between(6.0, 6.0)[0].tolist() == []
    assert r.between(7.0, 3.0)[0].tolist() == []


def test_peek_across_the_wrap_and_on_empty_ring() -> None:
    r = RingBuffer(8)
    assert [c.size for c in r.peek(0.0, 1.0)] == [0, 0, 0]
    for i in range(12):
        r.append(float(i), 0.0, float(i) * 3, i)
    t, v, q = r.peek(5.0, 10.0)
    assert t.tolist() == [5.0, 6.0, 7.0, 8.0, 9.0]
    assert v.tolist() == [15.0, 18.0, 21.0, 24.0, 27.0]
    assert q.tolist() == [5, 6, 7, 8, 9]
    assert r.peek(9.0, 11.0)[0].tolist() == [9.0, 10.0]
    assert r.peek(4.0, 6.0)[0].tolist() == [4.0, 5.0]
    assert r.peek(20.0, 30.0)[0].size == 0


def test_between_returns_copies() -> None:
    r = RingBuffer(4)
    for i in range(3):
        r.append(float(i), 0.0, float(i), 0)
    _, _, v, _ = r.between(0.0, 3.0)
    v[:] = -1.0
    assert r.rows()[2].tolist() == [0.0, 1.0, 2.0]


def test_between_on_empty_ring() -> None:
    t, tw, v, q = RingBuffer(4).between(0.0, 1.0)
    assert t.size == tw.size == v.size == q.size == 0
    assert q.dtype == np.uint8


def test_extend_stores_block_and_drops_out_of_order_rows() -> None:
    r = RingBuffer(16)
    r.append(0.5, 0.0, 0.0, 0)
    t, tw, v, q = cols([1.0, 2.0, 1.5, 3.0, math.nan, 0.2, 4.0])
    assert r.extend(t, tw, v, q) == 4
    assert r.out_of_order == 3
    held = r.rows()
    assert held[0].tolist() == [0.5, 1.0, 2.0, 3.0, 4.0]
    # Each kept row keeps its own wall time, value and quality.
    assert held[1].tolist() == [0.0, 1001.0, 1002.0, 1003.0, 1004.0]
    assert held[2].tolist() == [0.0, 2.0, 4.0, 6.0, 8.0]
    assert held[3].tolist() == [0, 0, 1, 3, 6]
    assert r.last_t_mono == 4.0


def test_extend_block_entirely_older_is_dropped() -> None:
    r = RingBuffer(4)
    r.append(10.0, 0.0, 0.0, 0)
    assert r.extend(*cols([1.0, 2.0])) == 0
    assert r.out_of_order == 2
    assert len(r) == 1


def test_extend_wraps_and_counts_overwritten() -> None:
    r = RingBuffer(5)
    r.extend(*cols([0.0, 1.0, 2.0, 3.0]))
    assert r.extend(*cols([4.0, 5.0, 6.0])) == 3
    assert r.overwritten == 2
    assert r.rows()[0].tolist() == [2.0, 3.0, 4.0, 5.0, 6.0]
    assert r.between(3.0, 6.0)[2].tolist() == [6.0, 8.0, 10.0]


def test_extend_larger_than_capacity_keeps_newest() -> None:
    r = RingBuffer(4)
    r.append(-1.0, 0.0, 0.0, 0)
    assert r.extend(*cols([float(i) for i in range(10)])) == 10
    assert r.rows()[0].tolist() == [6.0, 7.0, 8.0, 9.0]
    assert r.overwritten == 7  # the one older row plus six rows of the block itself
    assert len(r) == 4


def test_extend_rejects_columns_of_different_length() -> None:
    r = RingBuffer(4)
    t, tw, v, q = cols([1.0, 2.0])
    with pytest.raises(CorruptDataError, match="columns differ"):
        r.extend(t, tw[:1], v, q)


def test_extend_empty_block() -> None:
    r = RingBuffer(4)
    assert r.extend(*cols([])) == 0
    assert len(r) == 0


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="capacity 0"):
        RingBuffer(0)
    with pytest.raises(ConfigError):
        RingBuffer(4).resize(0)


def test_resize_grows_keeping_order_and_can_shrink() -> None:
    r = RingBuffer(4)
    for i in range(6):  # wrapped: held 2..5
        r.append(float(i), 0.0, float(i), 0)
    r.resize(8)
    assert r.capacity == 8
    assert r.rows()[0].tolist() == [2.0, 3.0, 4.0, 5.0]
    for i in range(6, 12):
        r.append(float(i), 0.0, float(i), 0)
    assert r.rows()[0].tolist() == [float(i) for i in range(4, 12)]
    overwritten = r.overwritten
    r.resize(3)
    assert r.rows()[0].tolist() == [9.0, 10.0, 11.0]
    assert r.overwritten == overwritten + 5
    assert r.last_t_mono == 11.0


def test_released_rows_are_recycled_without_counting_a_loss() -> None:
    r = RingBuffer(4)
    for i in range(4):
        r.append(float(i), 0.0, 0.0, 0)
    r.release(2.0)  # rows 0 and 1 consumed
    r.append(4.0, 0.0, 0.0, 0)
    r.append(5.0, 0.0, 0.0, 0)
    assert r.overwritten == 0
    r.append(6.0, 0.0, 0.0, 0)  # overwrites row 2, never released: data lost
    assert r.overwritten == 1
    assert r.accepted == 7
    r.release(100.0)
    r.extend(*cols([7.0, 8.0, 9.0]))
    assert r.overwritten == 1
    r.extend(*cols([10.0, 11.0, 12.0, 13.0, 14.0, 15.0]))  # 1 released row left, 2 rows never stored
    assert r.overwritten == 1 + 3 + 2
    assert r.accepted == 16
    assert r.rows()[0].tolist() == [12.0, 13.0, 14.0, 15.0]


def test_release_on_empty_ring_and_resize_keep_released_rows() -> None:
    r = RingBuffer(4)
    r.release(10.0)
    for i in range(4):
        r.append(float(i), 0.0, 0.0, 0)
    r.release(3.0)
    r.resize(2)  # drops rows 0 and 1, both released
    assert r.overwritten == 0
    r.append(4.0, 0.0, 0.0, 0)  # overwrites row 2, released
    assert r.overwritten == 0
    r.append(5.0, 0.0, 0.0, 0)  # overwrites row 3, not released
    assert r.overwritten == 1
    assert r.accepted == 6


def test_in_order_mask() -> None:
    t = np.array([1.0, 3.0, 2.0, 3.0, math.nan, 5.0, 4.9])
    assert in_order(t, 0.0).tolist() == [True, True, False, True, False, True, False]
    assert in_order(t, 3.0).tolist() == [False, True, False, True, False, True, False]
    assert in_order(np.empty(0), 0.0).size == 0


# ---- property: the ring behaves like a list trimmed to capacity ---------------------------

times = st.floats(min_value=0.0, max_value=100.0, allow_nan=False).map(lambda x: round(x, 1))
ops = st.lists(
    st.one_of(
        times.map(lambda t: ("append", [t])),
        st.lists(times, max_size=12).map(lambda ts: ("extend", ts)),
        times.map(lambda t: ("release", [t])),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(
    capacity=st.integers(min_value=1, max_value=16),
    ops=ops,
    t0=times,
    width=st.floats(min_value=0.0, max_value=60.0),
)
def test_ring_matches_brute_force_model(
    capacity: int, ops: list[tuple[str, list[float]]], t0: float, width: float
) -> None:
    r = RingBuffer(capacity)
    model: list[tuple[float, float, float, int]] = []  # every accepted row, in order
    released: set[float] = set()  # serials (column 2) of rows the owner released
    last = -math.inf
    dropped = 0
    serial = 0
    for kind, ts in ops:
        if kind == "release":
            released.update(row[2] for row in model[-capacity:] if row[0] < ts[0])
            r.release(ts[0])
            continue
        rows = []
        for t in ts:
            rows.append((t, t + 0.25, float(serial), serial % 5))
            serial += 1
        accepted = []
        for row in rows:
            if row[0] >= last:
                accepted.append(row)
                last = row[0]
            else:
                dropped += 1
        if kind == "append":
            assert r.append(*rows[0]) == bool(accepted)
        else:
            n = r.extend(
                np.array([row[0] for row in rows], np.float64),
                np.array([row[1] for row in rows], np.float64),
                np.array([row[2] for row in rows], np.float64),
                np.array([row[3] for row in rows], np.uint8),
            )
            assert n == len(accepted)
        model.extend(accepted)
    held = model[-capacity:]
    assert len(r) == len(held)
    assert r.out_of_order == dropped
    evicted = model[: len(model) - len(held)]
    assert r.overwritten == sum(1 for row in evicted if row[2] not in released)
    assert r.accepted == len(model)
    t1 = t0 + width
    expect = [row for row in held if t0 <= row[0] < t1]
    got = r.between(t0, t1)
    assert got[0].tolist() == [row[0] for row in expect]
    assert got[1].tolist() == [row[1] for row in expect]
    assert got[2].tolist() == [row[2] for row in expect]
    assert got[3].tolist() == [row[3] for row in expect]
    pt, pv, pq = r.peek(t0, t1)
    assert (pt.tolist(), pv.tolist(), pq.tolist()) == (got[0].tolist(), got[2].tolist(), got[3].tolist())
