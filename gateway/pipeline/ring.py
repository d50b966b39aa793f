"""A fixed-capacity, time-ordered ring of samples of one stream, stored as numpy columns.

The ring is the only per-sample state of the pipeline.  Writing one sample is a handful of item
assignments through memoryviews (no numpy call, no allocation), so a driver's hand-off costs
well under a microsecond; reading a window is two binary searches and a copy.

Rows are kept in ``t_mono`` order: a row older than the newest one already stored is dropped and
counted in :attr:`RingBuffer.out_of_order` rather than inserted, so every read can binary-search.
When the ring is full the oldest row is overwritten.  An owner that has consumed the older rows
says so with :meth:`RingBuffer.release`; overwriting a released row is the ring doing its job,
overwriting any other row loses data and is counted in :attr:`RingBuffer.overwritten`.  Without
``release`` every overwrite counts.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from gateway.errors import ConfigError, CorruptDataError

F8 = npt.NDArray[np.float64]
U1 = npt.NDArray[np.uint8]
Rows = tuple[F8, F8, F8, U1]

__all__ = ["RingBuffer", "Rows", "in_order"]


class RingBuffer:
    """Preallocated columns ``t_mono``, ``t_wall``, ``value``, ``quality`` of one stream."""

    __slots__ = (
        "_cap",
        "_head",
        "_last",
        "_mq",
        "_mtm",
        "_mtw",
        "_mv",
        "_q",
        "_recycled",
        "_released",
        "_size",
        "_tm",
        "_tw",
        "_v",
        "out_of_order",
        "overwritten",
    )

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ConfigError(
                f"ring buffer: capacity {capacity}: must hold at least one row: "
                "size it from rate x (window + grace) x a safety factor"
            )
        self._alloc(int(capacity))
        self._head = 0  # physical index of the next write
        self._size = 0
        self._last = -math.inf  # newest t_mono ever accepted; survives overwriting
        self._released = 0  # oldest rows held that the owner no longer needs
        self._recycled = 0  # released rows overwritten since (not a loss)
        self.out_of_order = 0
        self.overwritten = 0  # rows overwritten (or never written) before being released

    def _alloc(self, capacity: int) -> None:
        self._cap = capacity
        self._tm: F8 = np.empty(capacity, np.float64)
        self._tw: F8 = np.empty(capacity, np.float64)
        self._v: F8 = np.empty(capacity, np.float64)
        self._q: U1 = np.empty(capacity, np.uint8)
        # Item assignment through a memoryview skips numpy's scalar dispatch: ~20 ns against ~50.
        # (Cast via bytes: a typed view cannot be cast straight to another typed format.)
        self._mtm = self._tm.data.cast("B").cast("d")
        self._mtw = self._tw.data.cast("B").cast("d")
        self._mv = self._v.data.cast("B").cast("d")
        self._mq = self._q.data.cast("B")

    @property
    def capacity(self) -> int:
        """Rows the ring holds before it overwrites the oldest."""
        return self._cap

    @property
    def last_t_mono(self) -> float:
        """Newest ``t_mono`` accepted so far; ``-inf`` before the first row."""
        return self._last

    @property
    def last_t_wall(self) -> float:
        """``t_wall`` of the newest row held; NaN when the ring is empty."""
        if self._size == 0:
            return math.nan
        return float(self._tw[self._head - 1])  # index -1 is the last slot, as wanted after a wrap

    @property
    def last_value(self) -> float:
        """Value of the newest row held; NaN when the ring is empty."""
        if self._size == 0:
            return math.nan
        return float(self._v[self._head - 1])

    @property
    def first_t_mono(self) -> float:
        """Oldest ``t_mono`` still held; ``+inf`` when the ring is empty."""
        if self._size == 0:
            return math.inf
        return float(self._tm[(self._head - self._size) % self._cap])

    @property
    def accepted(self) -> int:
        """Rows accepted since creation, whether still held or overwritten since."""
        return self._size + self.overwritten + self._recycled

    def __len__(self) -> int:
        return self._size

    def _drop_oldest(self, k: int) -> None:
        """Account for ``k`` oldest rows being overwritten: released ones first, the rest are lost."""
        recycled = min(k, self._released)
        self._released -= recycled
        self._recycled += recycled
        self.overwritten += k - recycled

    def release(self, t_mono: float) -> None:
        """Mark rows older than ``t_mono`` as consumed: overwriting them is no longer counted."""
        if self._size:
            self._released = max(self._released, self._rank(t_mono))

    def append(self, t_mono: float, t_wall: float, value: float, quality: int) -> bool:
        """Store one row; False (and counted) when it is older than the newest row, or t_mono is NaN."""
        # Written as "not >=" so a NaN t_mono is refused too, at no extra cost.
        if not t_mono >= self._last:
            self.out_of_order += 1
            return False
        i = self._head
        self._mtm[i] = t_mono
        self._mtw[i] = t_wall
        self._mv[i] = value
        self._mq[i] = quality
        self._last = t_mono
        i += 1
        self._head = 0 if i == self._cap else i
        if self._size != self._cap:
            self._size += 1
        elif self._released:
            self._released -= 1
            self._recycled += 1
        else:
            self.overwritten += 1
        return True

    def extend(self, t_mono: F8, t_wall: F8, value: F8, quality: U1) -> int:
        """Store many rows; out-of-order rows are dropped and counted. Returns the rows accepted."""
        t = np.asarray(t_mono, np.float64)
        n = t.size
        if not (len(t_wall) == len(value) == len(quality) == n):
            raise CorruptDataError(
                f"ring buffer: extend: columns differ in length (t_mono {n}, t_wall {len(t_wall)}, "
                f"value {len(value)}, quality {len(quality)}): pass four columns of the same rows"
            )
        if n == 0:
            return 0
        tw = np.asarray(t_wall, np.float64)
        v = np.asarray(value, np.float64)
        q = np.asarray(quality, np.uint8)
        # Fast path: a block that is sorted and starts after the newest row (the usual case).
        # count_nonzero is several times cheaper than .all() on short arrays; NaN fails ">=".
        if not (t[0] >= self._last and (n == 1 or np.count_nonzero(t[1:] >= t[:-1]) == n - 1)):
            keep = in_order(t, self._last)
            t, tw, v, q = t[keep], tw[keep], v[keep], q[keep]
            self.out_of_order += n - t.size
            n = t.size
            if n == 0:
                return 0
        stored = n
        cap = self._cap
        if n > cap:
            # Rows that would be overwritten within this very call are never written.
            self.overwritten += n - cap
            t, tw, v, q = t[-cap:], tw[-cap:], v[-cap:], q[-cap:]
            n = cap
        size = self._size
        if size + n > cap:
            self._drop_oldest(size + n - cap)
            self._size = cap
        else:
            self._size = size + n
        h = self._head
        end = h + n
        if end <= cap:
            self._tm[h:end] = t
            self._tw[h:end] = tw
            self._v[h:end] = v
            self._q[h:end] = q
        else:
            first = cap - h
            for dst, src in ((self._tm, t), (self._tw, tw), (self._v, v), (self._q, q)):
                dst[h:] = src[:first]
                dst[: n - first] = src[first:]
            end -= cap
        self._head = 0 if end == cap else end
        self._last = float(t[-1])
        return stored

    def _logical(self, lo: int, hi: int) -> Rows:
        """Copies of logical rows ``[lo, hi)`` (0 = oldest held)."""
        cap = self._cap
        start = (self._head - self._size) % cap
        a = start + lo
        b = start + hi
        cols = (self._tm, self._tw, self._v, self._q)
        if b <= cap:
            return (cols[0][a:b].copy(), cols[1][a:b].copy(), cols[2][a:b].copy(), cols[3][a:b].copy())
        if a >= cap:
            a -= cap
            b -= cap
            return (cols[0][a:b].copy(), cols[1][a:b].copy(), cols[2][a:b].copy(), cols[3][a:b].copy())
        b -= cap
        return (
            np.concatenate((cols[0][a:], cols[0][:b])),
            np.concatenate((cols[1][a:], cols[1][:b])),
            np.concatenate((cols[2][a:], cols[2][:b])),
            np.concatenate((cols[3][a:], cols[3][:b])),
        )

    def _rank(self, t: float) -> int:
        """Logical index of the first held row with ``t_mono >= t``."""
        cap = self._cap
        start = self._head - self._size
        if start >= 0:  # held rows are contiguous
            return int(self._tm[start : self._head].searchsorted(t))
        older = self._tm[start + cap :]  # oldest rows, at the end of the arrays
        i = int(older.searchsorted(t))
        if i < older.size:
            return i
        return older.size + int(self._tm[: self._head].searchsorted(t))

    def between(self, t0: float, t1: float) -> Rows:
        """Copies of the rows with ``t0 <= t_mono < t1``, oldest first: t_mono, t_wall, value, quality."""
        if self._size == 0 or not t1 > t0:
            return _empty_rows()
        lo = self._rank(t0)
        hi = self._rank(t1)
        if hi <= lo:
            return _empty_rows()
        return self._logical(lo, hi)

    def peek(self, t0: float, t1: float) -> tuple[F8, F8, U1]:
        """``t_mono``, ``value``, ``quality`` of the rows with ``t0 <= t_mono < t1``, without copying.

        The arrays are views into the ring when the rows are contiguous: read them before the
        next write, and do not modify them.  Use :meth:`between` for arrays to keep.
        """
        size = self._size
        if size == 0 or not t1 > t0:
            e = _empty_rows()
            return e[0], e[2], e[3]
        start = self._head - size
        if start >= 0:  # held rows are contiguous: one search for both bounds
            lo, hi = self._tm[start : self._head].searchsorted((t0, t1)).tolist()
            a = start + lo
            b = start + hi
            return self._tm[a:b], self._v[a:b], self._q[a:b]
        lo = self._rank(t0)
        hi = self._rank(t1)
        if hi <= lo:
            e = _empty_rows()
            return e[0], e[2], e[3]
        a = start + self._cap + lo  # physical index of logical row lo
        b = start + self._cap + hi
        cap = self._cap
        if b <= cap:
            return self._tm[a:b], self._v[a:b], self._q[a:b]
        if a >= cap:
            return self._tm[a - cap : b - cap], self._v[a - cap : b - cap], self._q[a - cap : b - cap]
        b -= cap
        return (
            np.concatenate((self._tm[a:], self._tm[:b])),
            np.concatenate((self._v[a:], self._v[:b])),
            np.concatenate((self._q[a:], self._q[:b])),
        )

    def rows(self) -> Rows:
        """Copies of every row held, oldest first."""
        return self._logical(0, self._size)

    def resize(self, capacity: int) -> None:
        """Reallocate to ``capacity`` rows, keeping the newest; dropped rows count as overwritten."""
        if capacity < 1:
            raise ConfigError(
                f"ring buffer: resize to {capacity}: must hold at least one row: pass a positive capacity"
            )
        keep = min(self._size, capacity)
        tm, tw, v, q = self._logical(self._size - keep, self._size)
        self._drop_oldest(self._size - keep)
        self._alloc(int(capacity))
        self._tm[:keep] = tm
        self._tw[:keep] = tw
        self._v[:keep] = v
        self._q[:keep] = q
        self._size = keep
        self._head = keep % self._cap


def _empty_rows() -> Rows:
    return (np.empty(0, np.float64), np.empty(0, np.float64), np.empty(0, np.float64), np.empty(0, np.uint8))


def in_order(t_mono: F8, after: float) -> npt.NDArray[np.bool_]:
    """Which rows of ``t_mono`` a ring whose newest row is at ``after`` would accept, in sequence."""
    t = np.asarray(t_mono, np.float64)
    if t.size == 0:
        return np.ones(0, np.bool_)
    # A row is in order when it is not older than every row accepted before it; refused rows
    # never raise that running maximum, so the maximum over all rows equals the one over the
    # accepted rows. fmax ignores NaN, and NaN >= x is False, so NaN rows are refused.
    prev = np.empty_like(t)
    prev[0] = after
    np.fmax.accumulate(t[:-1], out=prev[1:])
    np.fmax(prev, after, out=prev)
    return t >= prev
