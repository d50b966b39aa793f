"""Windows that hold only part of their span: not judged, not learned from.

After a start, and after a stream returns from an outage, a model's window holds only the seconds
since: a 300 s window cut 10 s after the first sample has features over 10 s, not over the span
the model was trained and commissioned on.  A model judges a window only when each of its input
streams holds at least ``min_coverage`` of the samples the windower expects over that window (its
``missing`` fraction, from the stream's nominal rate); below that the verdict is indeterminate
(``partial``), and the window neither commissions nor adapts the model.  A stream without a
nominal rate (an event series, a report-on-change tag) expects no count and is never partial for
being sparse (:meth:`gateway.contracts.StreamFeatures.partial`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence

from gateway.contracts import ModelResult, StreamFeatures

__all__ = ["PARTIAL", "Coverage"]

log = logging.getLogger(__name__)

#: The verdict on a window one of whose inputs holds too little of its span.
PARTIAL = ModelResult(math.nan, False, reason="partial")


class Coverage:
    """One model's coverage rule: which windows are partial, how many were, state changes logged."""

    def __init__(self, model: str, min_coverage: float) -> None:
        self.model = model
        self.min_coverage = float(min_coverage)
        # StreamFeatures.partial as one comparison per stream: this runs for every window of every model.
        self._max_missing = 1.0 - self.min_coverage + 1e-9
        self.partial_windows = 0  # windows not judged as partial since the start
        self._short: set[str] = set()  # subjects whose last window was partial

    def short_stream(
        self,
        subject: str,
        streams: Sequence[StreamFeatures],
        positions: Iterable[int] | None = None,
        *,
        count: bool = True,
    ) -> StreamFeatures | None:
        """The first of a window's input ``streams`` (those at ``positions``) holding too little of it, else None.

        ``count``: the window is not judged (a per-stream detector still judges the other streams).
        """
        limit = self._max_missing
        short = None
        for sf in streams if positions is None else [streams[p] for p in positions]:
            if sf.missing > limit and sf.count:
                short = sf
                break
        if short is not None:
            self.partial_windows += count
            if subject not in self._short:
                self._short.add(subject)
                log.info(
                    "models %s: subject %s: stream %s holds %.0f%% of its window (%.0f%% needed, after a "
                    "start or an outage): its windows are not judged until they hold enough",
                    self.model,
                    subject,
                    # The metric, not the stream key: its device may not be known to the log
                    # redactor yet (the first windows are scored before any record is sealed).
                    short.stream.metric.name,
                    100.0 * (1.0 - short.missing),
                    100.0 * self.min_coverage,
                )
        elif self._short and subject in self._short:
            self._short.discard(subject)
            log.info("models %s: subject %s: its input streams fill their windows again", self.model, subject)
        return short
