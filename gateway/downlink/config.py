"""``[downlink]``: where the trusted keys are and how long an applied config may take to prove itself."""

from __future__ import annotations

from pydantic import Field

from gateway.config_base import ConfigModel, PathField


class DownlinkSection(ConfigModel):
    # The twin's public keys this gateway accepts (JSON written by 'edgetwin twin keygen --trust').
    # None: the downlink is off and the gateway subscribes to nothing.
    trust_file: PathField | None = None
    # After a restart on a new config: READY with every unit healthy and the broker reached within this.
    apply_deadline_s: float = Field(60.0, gt=1, le=600)
    # A unit must stay healthy this long to count (a source that connects and drops again does not).
    settle_s: float = Field(3.0, ge=0, le=60)
    # A new key and CSR go to the twin when the client certificate has fewer days left than this.
    renew_before_days: float = Field(30.0, ge=0, le=3650)
