"""What the downlink's reported state says about the site: sources by pseudonym, texts with an identity withheld.

Through a real gateway, broker and the twin's CLI:
``tests/test_downlink_e2e.py::test_a_rolled_back_bed_source_is_named_by_pseudonym_and_the_legend_names_it_on_site``.
"""

from __future__ import annotations

from gateway.anonymize import Anonymizer, Pseudonymizer
from gateway.downlink.public import WITHHELD, named, unit, units, withhold

BED = "bed7-sim"  # the source's name in downlink_support's configs: a bed number in it


def test_sources_are_named_by_pseudonym_and_a_text_holding_an_identity_is_withheld() -> None:
    anon = Anonymizer(Pseudonymizer(b"k" * 32), time_mode="relative", local_identities=["SN-MON-1187"])
    label = anon.source_label(BED)
    assert label == f"source~{Pseudonymizer(b'k' * 32)('source', BED)}"
    assert units(
        ["source:bed7-sim", "uplink", "sources[bed7-sim]: its subject or name is in [estimators]"],
        anon.source_label,
    ) == [
        label,
        "uplink",
        f"sources[{label}]: its subject or name is in [estimators]",
    ]
    assert unit("pipeline", anon.source_label) == "pipeline"
    doc = {
        "units": {label: "running", "Bed7-Sim": "failed", "BED7SIM": "failed"},
        "models": {"pump_skab": {"transfer": {"path": "sn-mon-1187.onnx"}}},
        "phase": "running",
        "accepted": 3,
    }
    safe, count = withhold(doc, anon.holds_identity)
    assert count == 3
    assert safe["units"] == {label: "running", "withheld-1": "failed", "withheld-2": "failed"}
    assert safe["models"]["pump_skab"]["transfer"]["path"] == WITHHELD
    assert (safe["phase"], safe["accepted"]) == ("running", 3)
    assert (
        named(f"v3 rolled back: unhealthy ({label})", {label: BED})
        == "v3 rolled back: unhealthy (source:bed7-sim)"
    )
    assert named(f"({label})", {}) == f"({label})"
