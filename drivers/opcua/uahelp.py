"""Typed constructors for asyncua values whose annotations use asyncua's own scalar classes.

asyncua annotates fields with ``ua.Int32``, ``ua.Boolean``, ``ua.DateTime``... while accepting
plain Python values at run time; these helpers build the values once, typed, so the rest of the
driver needs no ``type: ignore``.
"""

from __future__ import annotations

import datetime as dt
from typing import cast

from asyncua import ua

UA_TRUE = cast("ua.Boolean", True)
UA_FALSE = cast("ua.Boolean", False)


def node_id(identifier: int | str, ns: int = 0) -> ua.NodeId:
    """A NodeId from a numeric or string identifier and a namespace index."""
    ident = ua.Int32(identifier) if isinstance(identifier, int) else ua.String(identifier)
    return ua.NodeId(ident, ua.Int16(ns))


def ua_time(when: dt.datetime) -> ua.DateTime:
    """A timezone-aware datetime as asyncua's DateTime."""
    return cast("ua.DateTime", when)


def status_code(code: int) -> ua.StatusCode:
    """A StatusCode from its 32-bit value."""
    return ua.StatusCode(ua.UInt32(code))
