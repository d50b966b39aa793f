"""Metric names that hold a configured identity: found at check and at start, not by every record dropped.

A window record carries its streams' metric names.  One whose name holds a form of an identity
the anonymizer knows (a subject, a device, the gateway's or the host's name, a source's name; any
letter case, compact or not: a subject ``line-10`` is in the tag ``Line10/Temp``) fails the
anonymizer's scan, and every record carrying it is dropped (:mod:`gateway.anonymize`).  That is
right, the name names the machine or the patient, but a site would learn of it only by missing
data.  The names each enabled source's config declares (``delivers()``) are scanned here with the
records' own scan (:meth:`Anonymizer.holds_identity`): one anonymizer that knows them all, and on a
hit one per identity, so a finding says which identity it is, by kind and where it is configured,
without its text.  Names known only at run time (an OPC UA node without ``name`` or browse path, a
microcontroller node's channels) and identities a device reports are not known before then.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from gateway.alarms.ledger import Delivers
from gateway.anonymize import Anonymizer, Pseudonymizer


@dataclass(frozen=True, slots=True)
class Identity:
    """A configured identity, said by where it is configured (``who``), never by its text."""

    who: str  # "the subject of source line10", "the gateway name (gateway.name)"
    text: str
    words: bool = True  # a source's name: its 2-3 character forms are no identity (Anonymizer.register)
    renamable: bool = False  # a name the site gives (a subject), not one a device has (its address)


@dataclass(frozen=True, slots=True)
class HeldName:
    """A metric a source delivers whose name holds a configured identity."""

    source: str
    metric: str
    holds: tuple[Identity, ...]

    def reason(self) -> str:
        """What is wrong, for check, the start's log and status: the identity by where it is configured."""
        return (
            f"source {self.source}: metric {self.metric!r} holds {' and '.join(i.who for i in self.holds)}: "
            "the anonymizer drops every record carrying it (its subject's windows, its alarms and estimates)"
        )

    def fix(self) -> str:
        """What to do about it: rename the metric, or the identity when the site names it."""
        renamable = [i.who for i in self.holds if i.renamable]
        return (
            f"give the metric a name without it (the name or metric key of its node or channel in source "
            f"{self.source})" + (f", or rename {' or '.join(renamable)}" if renamable else "")
        )


def _probe(identities: Iterable[Identity]) -> Anonymizer:
    """An anonymizer that knows ``identities`` alone (not the host name unless among them)."""
    probe = Anonymizer(Pseudonymizer(secrets.token_bytes(32)), time_mode="relative", host_name=False)
    for identity in identities:
        probe.register(identity.text, words=identity.words)
    return probe


def held_names(delivers: Mapping[str, Delivers], identities: Iterable[Identity]) -> list[HeldName]:
    """The declared metric names (by source, as ``delivers`` gives them) that hold one of ``identities``."""
    # By identity text: a subject shared by two sources is scanned once, named twice.
    same: dict[tuple[str, bool], list[Identity]] = {}
    for identity in identities:
        if identity.text:
            named = same.setdefault((identity.text, identity.words), [])
            if identity.who not in {i.who for i in named}:
                named.append(identity)
    # One scan of each name against all of them, as a record's; a probe per identity only on a hit
    # (a probe per identity for every name costs names x identities scans, seconds for a large plant).
    every = _probe(ids[0] for ids in same.values())
    probes: list[tuple[Anonymizer, list[Identity]]] | None = None
    out: list[HeldName] = []
    for source, by_device in delivers.items():
        names = sorted({n for metrics in by_device.values() if metrics is not None for n in metrics})
        for metric in names:
            if not every.holds_identity(metric):
                continue
            if probes is None:
                probes = [(_probe(ids[:1]), ids) for ids in same.values()]
            holds = [i for probe, ids in probes if probe.holds_identity(metric) for i in ids]
            if holds:
                out.append(HeldName(source, metric, tuple(dict.fromkeys(holds))))
    return out
