from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

def streams(
    ts: Sequence[npt.NDArray[np.float64]], vs: Sequence[npt.NDArray[np.float64]]
) -> list[dict[str, float]] | None: ...
