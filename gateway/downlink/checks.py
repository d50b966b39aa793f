"""``edgetwin check`` findings for ``[downlink]``: the trust file loads and names at least one key."""

from __future__ import annotations

from gateway.config import Config
from gateway.downlink.errors import TrustError
from gateway.downlink.signing import Trust
from gateway.observe.check import Finding, Level


def trust_findings(config: Config) -> list[Finding]:
    """One finding on the trust file when the downlink is on; none when it is off."""
    core = config.core
    path = core.downlink.trust_file
    if path is None:
        return []
    if core.uplink.kind != "mqtt":
        return [
            Finding(
                Level.FAIL,
                "downlink",
                f"downlink.trust_file is set but uplink.kind is {core.uplink.kind!r}",
                'the downlink rides on the MQTT uplink: set uplink.kind = "mqtt" or remove [downlink]',
            )
        ]
    try:
        trust = Trust.load(path)
    except TrustError as exc:
        return [
            Finding(Level.FAIL, "downlink", str(exc), "write it with 'edgetwin twin keygen --trust FILE'")
        ]
    usable = [k for k in trust.keys if k not in trust.revoked]
    if len(usable) < trust.threshold:
        return [
            Finding(
                Level.FAIL,
                "downlink",
                f"trust file {path}: {len(usable)} key(s) not revoked, threshold {trust.threshold}",
                "add keys with 'edgetwin twin keygen --trust' or lower the threshold",
            )
        ]
    return [
        Finding(
            Level.PASS,
            "downlink",
            f"trust file {path}: {len(usable)} key(s), threshold {trust.threshold}, {len(trust.revoked)} revoked",
        )
    ]
