"""Battery state of charge by an extended Kalman filter on a first-order equivalent circuit.

Circuit: open-circuit voltage ``OCV(SoC)`` (a polynomial), series resistance ``R0`` and one RC pair
(``R1``, time constant ``tau``).  State ``[SoC, V1]``; input the discharge current ``i`` (A, positive
when discharging); measurement the terminal voltage ``V = OCV(SoC) - R0 i - V1``.

The prediction is coulomb counting against the capacity ``capacity_ah`` (the state of health sets
it: capacity fades as a cell ages); the voltage update corrects what counting cannot know - the
starting charge and the current sensor's drift.  An aging cell's series resistance grows too
(on the NASA cells from 0.07 to ~0.2 ohm); with ``r0_sd`` > 0 it is a third state, a random walk
(``q_r0``) learnt from the voltage step at each change of current, so the voltage update does not
read the extra drop as lost charge.  Pure compute, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["BatteryEkf", "CellModel"]

F64 = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class CellModel:
    """Equivalent-circuit parameters of one cell type."""

    ocv: tuple[float, ...]  # polynomial coefficients in SoC, lowest order first
    r0: float  # ohm
    r1: float  # ohm
    tau_s: float  # R1 * C1, seconds

    def ocv_at(self, soc: float) -> tuple[float, float]:
        """OCV and dOCV/dSoC at ``soc`` (clamped to [0, 1])."""
        s = min(max(soc, 0.0), 1.0)
        c = self.ocv
        v = 0.0
        d = 0.0
        for k in range(len(c) - 1, -1, -1):
            d = d * s + v
            v = v * s + c[k]
        return v, d

    def soc_from_rest(self, voltage: float) -> float:
        """The SoC whose OCV is ``voltage`` (a rested cell), by bisection."""
        lo, hi = 0.0, 1.0
        for _ in range(40):
            mid = (lo + hi) / 2.0
            if self.ocv_at(mid)[0] < voltage:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2.0


class BatteryEkf:
    """EKF over ``[SoC, V1]``; see the module docstring."""

    def __init__(
        self,
        cell: CellModel,
        capacity_ah: float,
        *,
        soc0: float,
        soc0_sd: float = 0.05,
        q_soc: float = 1e-10,
        q_v1: float = 1e-6,
        r_v: float = 1e-4,
        r0: float | None = None,
        r0_sd: float = 0.0,
        q_r0: float = 1e-12,
    ) -> None:
        if not capacity_ah > 0:
            raise ValueError(f"battery ekf: capacity {capacity_ah} Ah: must be > 0")
        self.cell = cell
        self.capacity_ah = capacity_ah
        # State [SoC, V1, R0]; with r0_sd = 0 the resistance is fixed (its variance stays 0).
        self.x = np.array([soc0, 0.0, cell.r0 if r0 is None else r0])
        self.p = np.diag([soc0_sd**2, 1e-4, r0_sd**2])
        self.q = np.diag([q_soc, q_v1, q_r0 if r0_sd > 0 else 0.0])
        self.r = r_v

    @property
    def soc(self) -> float:
        """State of charge, 0..1."""
        return float(self.x[0])

    @property
    def r0(self) -> float:
        """Series resistance (ohm): the cell model's, or the learnt one."""
        return float(self.x[2])

    @property
    def soc_sd(self) -> float:
        """Standard deviation of the state of charge."""
        return math.sqrt(float(self.p[0, 0]))

    def step(self, dt_s: float, current_a: float, voltage: float) -> float:
        """Advance by ``dt_s`` under discharge current ``current_a`` and fold in ``voltage``; return SoC."""
        cell = self.cell
        a = math.exp(-dt_s / cell.tau_s) if dt_s > 0 else 1.0
        f = np.diag([1.0, a, 1.0])
        self.x = np.array(
            [
                self.x[0] - current_a * dt_s / (3600.0 * self.capacity_ah),
                a * self.x[1] + cell.r1 * (1.0 - a) * current_a,
                self.x[2],
            ]
        )
        self.p = f @ self.p @ f.T + self.q * max(dt_s, 1e-3)
        if math.isfinite(voltage):
            ocv, docv = cell.ocv_at(float(self.x[0]))
            h = np.array([docv, -1.0, -current_a])
            y = voltage - (ocv - float(self.x[2]) * current_a - float(self.x[1]))
            s = float(h @ self.p @ h) + self.r
            k = (self.p @ h) / s
            self.x = self.x + k * y
            self.p = (np.eye(3) - np.outer(k, h)) @ self.p
        return self.soc

    def run(
        self, t: Sequence[float] | F64, current_a: Sequence[float] | F64, voltage: Sequence[float] | F64
    ) -> F64:
        """SoC after each sample of a series (times in seconds)."""
        out = np.empty(len(t))
        prev = float(t[0])
        for i in range(len(t)):
            out[i] = self.step(float(t[i]) - prev, float(current_a[i]), float(voltage[i]))
            prev = float(t[i])
        return out
