"""Where the shared data sets are: ``EDGETWIN_DATA``, else ``../shared/data`` beside the repository.

Tests that read them skip with a message naming this folder when a data set is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA = Path(os.environ.get("EDGETWIN_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
