"""A turbofan that wears out: fourteen per-cycle sensors drifting towards failure (the ``engine`` profile).

Each sample of a stream is one operating cycle (``rate_hz`` cycles per second: the gateway's
``[[estimators.rul]] cycle_s`` is its inverse).  A sensor reads
``base + delta * (exp(g x) - 1) / (exp(g) - 1) + noise * N(0, 1)`` at life fraction ``x`` =
cycle / ``life_cycles``: flat while healthy, bending towards the failure values late in life, as
the C-MAPSS FD001 engines do.  ``base``, ``noise`` and ``delta`` per sensor and ``g`` were fitted
on FD001's 100 training engines by ``models/recipes/rul_cmapss.py`` (its card's
``training.degradation``); each engine's life (150-300 cycles) and small offsets come from the seed.
Past its life the engine stays at its failure values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from drivers.sim.protocol import Generator, Label, Signal, _Event
from gateway.sample import Quality, industrial_metric

__all__ = ["ENGINE_SENSORS", "EngineGenerator"]

F64 = npt.NDArray[np.float64]

#: (C-MAPSS sensor name, unit, early-life mean, noise SD, shift at failure), FD001 fit.
ENGINE_SENSORS: tuple[tuple[str, str, float, float, float], ...] = (
    ("T24", "[degR]", 642.38322, 0.37955, 1.28678),
    ("T30", "[degR]", 1586.89848, 4.64824, 15.39058),
    ("T50", "[degR]", 1402.83102, 5.93076, 26.09574),
    ("P30", "[psi]", 553.94767, 0.62373, -2.45283),
    ("Nf", "/min", 2388.05922, 0.05505, 0.1729),
    ("Nc", "/min", 9056.06208, 8.40255, 41.9299),
    ("Ps30", "[psi]", 47.35608, 0.17686, 0.78612),
    ("phi", "1", 521.90485, 0.50677, -2.09567),
    ("NRf", "/min", 2388.05674, 0.05503, 0.17676),
    ("NRc", "/min", 8137.38407, 7.95527, 29.48241),
    ("BPR", "1", 8.41838, 0.02643, 0.10202),
    ("htBleed", "1", 392.27, 1.14241, 3.97),
    ("W31", "[lbm]/s", 38.93225, 0.12959, -0.48625),
    ("W32", "[lbm]/s", 23.35917, 0.07871, -0.28918),
)
SHAPE_G = 4.0
PREFIX = "Engine/"


class EngineGenerator(Generator):
    """One turbofan from new to failure; see the module docstring."""

    profile = "engine"
    # sensor_off models the turbine-temperature probes losing their harness.
    _fault_signals = frozenset({PREFIX + "T30", PREFIX + "T50"})
    _fault_flag = Quality.BAD_STATUS

    def __init__(
        self, *, seed: int, rate_hz: float, events: Sequence[Label] = (), random_events_per_hour: float = 0.0
    ) -> None:
        super().__init__(
            seed=seed, rate_hz=rate_hz, events=events, random_events_per_hour=random_events_per_hour
        )
        #: Cycles from new to failure.
        self.life_cycles = 150 + int(150 * self._base[0])
        self._signals = tuple(
            Signal(industrial_metric(PREFIX + n, u), rate_hz) for n, u, *_ in ENGINE_SENSORS
        )
        # Each engine sits a little off the fleet's mean (a third of a noise SD per sensor).
        self._sensor = {
            PREFIX + n: (base + noise * (self._base[1 + i % 15] - 0.5) * 0.66, noise, delta)
            for i, (n, _, base, noise, delta) in enumerate(ENGINE_SENSORS)
        }

    @property
    def signals(self) -> tuple[Signal, ...]:
        """The fourteen engine sensors."""
        return self._signals

    def rul(self, cycle: int) -> int:
        """The true remaining useful life (cycles) at ``cycle`` (0 from failure on)."""
        return max(self.life_cycles - cycle, 0)

    def _values(self, name: str, idx: npt.NDArray[np.int64], t: F64, events: Sequence[_Event]) -> F64:
        del t, events
        try:
            base, noise, delta = self._sensor[name]
        except KeyError:
            raise ValueError(f"sim engine generator: no stream {name!r}") from None
        x = np.minimum(idx / self.life_cycles, 1.0)
        wear = (np.exp(SHAPE_G * x) - 1.0) / (math.exp(SHAPE_G) - 1.0)
        return base + delta * wear + noise * self._draws.normal(name, idx)
