"""A window's contributions computed when first read (a fusion member's unflagged windows).

A model in a ``[[models.fusion]]`` (``explain_all``) hands every scored window's contributions
to the fusion, which reads them only for the windows it flags.  Explaining a window the member
does not flag when it is scored cost more than scoring it (the occlusion runs the model once per
input; the novelty detector decomposes T² and SPE): such a window carries a :class:`Deferred`
instead, computed from what the window was scored with when its contributions are first read,
and the same to the bit as computed at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

__all__ = ["Deferred"]


class Deferred(Mapping[str, float]):
    """A window's contributions, computed by ``make`` when first read, then kept."""

    __slots__ = ("_got", "_make")

    def __init__(self, make: Callable[[], dict[str, float]]) -> None:
        self._make: Callable[[], dict[str, float]] | None = make
        self._got: dict[str, float] | None = None

    def _value(self) -> dict[str, float]:
        got = self._got
        if got is None:
            make = self._make
            got = {} if make is None else make()
            self._got, self._make = got, None  # the window's inputs are let go
        return got

    def __getitem__(self, key: str) -> float:
        return self._value()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._value())

    def __len__(self) -> int:
        return len(self._value())

    def __repr__(self) -> str:
        return repr(self._value())
