from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

F8 = npt.NDArray[np.float64]

def features(ts: Sequence[F8], vs: Sequence[F8]) -> list[dict[str, float]] | None: ...
def dense_row(x: npt.NDArray[np.float32] | F8, layers: tuple[tuple[F8, F8, int], ...]) -> float | None: ...
