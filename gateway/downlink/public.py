"""What the reported state may say about the site: sources by pseudonym, no field holding an identity (pure).

A source's name is a registered identity (``bed7-sim`` names a bed), so the reported state names
a source unit ``source~<pseudonym>`` (keyed, purpose ``source``; ``edgetwin legend`` maps it back
on site) where the gateway's own log says ``source:<name>``.  Then every text of the document,
keys and values at any depth, is scanned as the anonymizer scans a topic; a text holding a form of
an identity is replaced by :data:`WITHHELD` and counted, so the rest of the report still reaches
the twin (its rollouts judge phases, versions and unit states, never free text).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

SOURCE_UNIT = "source:"
WITHHELD = "withheld"
# "sources[<name>]: ..." - why a revision restarts the process (gateway.downlink.diff).
_SOURCE_REASON = re.compile(r"^sources\[(?P<name>.*?)\]: ")
# A source as the reported state names it: the label of gateway.anonymize.Anonymizer.source_label.
SOURCE_LABEL = re.compile(r"source~[a-z2-7]{16}")


def unit(name: str, label: Callable[[str], str]) -> str:
    """A unit's name as reported: ``source:<name>`` becomes ``label(name)``, other units keep theirs."""
    if name.startswith(SOURCE_UNIT):
        return label(name[len(SOURCE_UNIT) :])
    match = _SOURCE_REASON.match(name)
    if match is not None:
        return f"sources[{label(match['name'])}]: {name[match.end() :]}"
    return name


def units(names: list[str] | tuple[str, ...], label: Callable[[str], str]) -> list[str]:
    """Each of ``names`` as reported (see :func:`unit`)."""
    return [unit(n, label) for n in names]


def withhold(doc: Any, holds: Callable[[str], bool]) -> tuple[Any, int]:
    """``doc`` with every text (key or value, at any depth) that ``holds`` an identity replaced; how many were."""
    count = 0

    def walk(value: Any) -> Any:
        nonlocal count
        if isinstance(value, str):
            if holds(value):
                count += 1
                return WITHHELD
            return value
        if isinstance(value, list | tuple):
            return [walk(v) for v in value]
        if isinstance(value, dict):
            out: dict[str, Any] = {}
            for key, item in value.items():
                name = str(key)
                if holds(name):
                    count += 1
                    name = f"{WITHHELD}-{len(out)}"  # keys stay distinct: a map of units keeps its size
                out[name] = walk(item)
            return out
        return value  # numbers, booleans, None: counters and versions

    return walk(doc), count


def named(text: str, legend: dict[str, str]) -> str:
    """``text`` with each ``source~<pseudonym>`` the legend knows shown as ``source:<name>`` (the twin's view)."""
    if not legend:
        return text
    return SOURCE_LABEL.sub(
        lambda m: f"{SOURCE_UNIT}{legend[m[0]]}" if m[0] in legend else m[0],
        text,
    )
