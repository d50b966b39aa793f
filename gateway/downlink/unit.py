"""The downlink unit: desired state in over the uplink's MQTT session, reported state out.

Topics, under the gateway's topic root ``<prefix>/<pseudonym>``:

* ``desired`` (the twin publishes, retained, QoS 1): a signed config envelope.  Retained, so a
  gateway that was offline gets the newest one when it connects; older ones are gone.
* ``cmd`` (the twin publishes, QoS 1): ``{"cmd": "report"}`` asks for the reported state again,
  ``{"cmd": "rebirth"}`` for the uplink's status record.
* ``reported`` (the gateway publishes, retained, QoS 1): what runs now, what is being applied,
  what was refused and why, and the audit log's head.

On the ``azure`` profile the same travel over IoT Hub's device twin and direct methods
(:mod:`gateway.downlink.azure`).

A desired state goes: quarantine -> verified (:mod:`~gateway.downlink.signing`) -> staged and
checked as ``edgetwin check`` checks -> written in place of the config file (the old one kept) ->
only the units it changes restart (:mod:`~gateway.downlink.diff`: sources in place, the uplink
reconnected last) or, for a process-level section, the whole gateway restarts onto it ->
*probation*: READY, every unit that was healthy before healthy again and the broker reached,
within ``apply_deadline_s`` -> applied; otherwise the old file is restored and the previous
settings go back the same way (rolled back).  Each step is in the audit log.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from gateway.anonymize import Anonymizer, Pseudonymizer, load_or_create_key
from gateway.cleanup import cancel_requested
from gateway.config import Config
from gateway.contracts import DriverSpec
from gateway.downlink import public, restart
from gateway.downlink import state as persist
from gateway.downlink.audit import AuditLog
from gateway.downlink.azure import AzureTwin
from gateway.downlink.bundles import ModelBundles
from gateway.downlink.diff import Plan, plan
from gateway.downlink.errors import RefusedError
from gateway.downlink.renewal import Renewal
from gateway.downlink.signing import MAX_ENVELOPE_BYTES, Trust, Verified, verify, verify_rotation
from gateway.errors import ConfigError, EdgetwinError
from gateway.inference.shadow import Slot
from gateway.supervisor import Supervisor, UnitState

log = logging.getLogger(__name__)

MAX_STARTS_ON_PENDING = 3  # process starts on an unproven revision before it counts as a crash loop
_POLL_S = 0.25
_REPORT_EVERY_S = 1.0
_RENEW_CHECK_S = 3600.0  # how often the certificate's expiry is looked at
_QUIET_REPEATS = 100  # an identical malformed refusal again: recorded once per this many
# Why a revision was rolled back, as reported (the full text stays in the log and the audit file).
ROLLBACK_CAUSES = ("unhealthy", "not-ready", "uplink", "crash-loop", "exited", "not-written")


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Downlink:
    """Receives desired state, applies it so it cannot brick the gateway, reports back."""

    def __init__(
        self,
        config: Config,
        registry: Mapping[str, DriverSpec],
        supervisor: Supervisor,
        uplink: Any,
        gateway_id: str,
        slots: Sequence[Slot] = (),
        anonymizer: Anonymizer | None = None,
    ) -> None:
        core = config.core
        # Names sources by pseudonym and scans the reported state (gateway.downlink.public); the
        # gateway's own, which knows every identity seen; else one knowing the config's.
        self._anon = anonymizer or _config_anonymizer(config)
        self.withheld = 0  # texts of the reported state replaced because they held an identity
        self._config = config
        self._section = core.downlink
        self._registry = registry
        self._sup = supervisor
        self._uplink = uplink
        self.gateway_id = gateway_id
        self.dir = core.gateway.state_dir / "downlink"
        self.quarantine = self.dir / "quarantine"
        self._state_path = self.dir / "state.json"
        self.state = persist.DownlinkState()
        self.audit: AuditLog | None = None
        self._trust: Trust | None = None
        self._client: Any = None
        self._root = ""
        self._desired: bytes | None = None  # the newest desired state not yet handled
        self._digest = ""  # SHA-256 of the desired state being handled
        self._rotation: bytes | None = None  # the newest trust set not yet handled
        self._wake = asyncio.Event()
        self.phase = "starting"
        mqtt = core.uplink.mqtt
        self._azure = mqtt is not None and mqtt.profile == "azure"
        self._renewal = Renewal(mqtt, self.dir / "renew", gateway_id) if mqtt is not None else None
        # Model bundles for the slots the pipeline runs (gateway.downlink.bundles); on IoT Hub the
        # manifest rides in the device twin and the chunks come as cloud-to-device messages.
        self.bundles = (
            ModelBundles(slots, core.gateway.state_dir, self.dir, gateway_id, mqtt.profile)
            if slots and mqtt is not None
            else None
        )
        self._cert: bytes | None = None  # a signed certificate from the twin, not yet handled
        self._twin: AzureTwin | None = None  # the device twin on the azure profile, while connected
        self._next_renew_check = 0.0  # monotonic: a clock step does not move it
        self._trial_until: float | None = None  # the new pair must connect before this (monotonic)
        self._attaches = 0  # connections so far; one after the install proves the new pair
        self._attach_mark = 0
        self._last_refusal: tuple[str, str] | None = None  # reason and detail of the newest malformed one
        self._repeats = 0  # identical malformed refusals not recorded since
        # Restarts sources in place (gateway.downlink.sources); None: every revision restarts the process.
        self.sources: Any = None
        self._undo: tuple[Plan, Config] | None = None  # an in-place revision on probation: how to go back
        self._started_at = _now()  # this process's start: a revision applied in place does not move it
        self._shown: dict[str, str] = {}  # the unit states last reported
        self._uplink_mark: int | None = None  # connections before the uplink was retargeted in place

    # --- the hook the MQTT uplink calls on each connection ----------------------------------------

    def attach(self, client: Any, topic_root: str) -> None:
        """Subscribe on a new connection and publish the reported state."""
        self._client, self._root = client, topic_root
        self._attaches += 1
        client.on_message = self._on_message
        if self._azure:  # IoT Hub: the device twin and direct methods (gateway.downlink.azure)
            self._twin = AzureTwin(client, self._take, self._method, ready=self.report)
            self._twin.start()
            if self.bundles is not None:  # the chunks' cloud-to-device messages
                client.subscribe([(topic, 1) for topic in self.bundles.attach(client, topic_root)])
            return
        topics = [f"{topic_root}/{name}" for name in ("desired", "trust", "cmd", "cert")]
        if self.bundles is not None:
            topics += self.bundles.attach(client, topic_root)
        client.subscribe([(topic, 1) for topic in topics])
        self.report()
        if self._renewal is not None and self._renewal.pending:
            self._publish_csr()

    def detach(self) -> None:
        """The connection ended: nothing to publish on until the next one."""
        self._client = None
        self._twin = None

    def _take(self, kind: str, data: bytes) -> None:
        """A desired value from the Azure twin: handled as the generic topic of that kind would be."""
        if kind == "config":
            self._desired = data
        elif kind == "trust":
            self._rotation = data
        elif kind == "model":
            if self.bundles is None:
                log.debug("downlink: a model bundle in the twin, and no model slot here: ignored")
                return
            self.bundles.take_manifest(data)
        else:
            self._cert = data
        self._wake.set()

    def _method(self, name: str) -> int:
        """An Azure direct method: the generic commands, with a status for the caller."""
        return 200 if self._command(name, f"{self._root} direct method") else 404

    def _command(self, cmd: Any, where: str) -> bool:
        if cmd == "report":
            self.report()
        elif cmd == "rebirth" and getattr(self._uplink, "rebirth", None) is not None:
            self._uplink.rebirth()
        else:
            log.warning("downlink %s: unknown command %r: ignored; known: report, rebirth", where, cmd)
            return False
        return True

    def _on_message(self, _client: Any, _userdata: Any, message: Any) -> None:
        # paho calls this on the event loop (the uplink drives its network loop there).
        if self._twin is not None and self._twin.handles(message.topic):
            self._twin.on_message(message.topic, bytes(message.payload))
        elif self.bundles is not None and self.bundles.on_message(message.topic, message.payload):
            self._wake.set()
        elif message.topic.endswith("/desired"):
            if message.payload:
                # The newest wins: an older one not yet handled is dropped.
                self._desired = bytes(message.payload)
                self._wake.set()
        elif message.topic.endswith("/trust"):
            if message.payload:
                self._rotation = bytes(message.payload)
                self._wake.set()
        elif message.topic.endswith("/cert"):
            if message.payload:
                self._cert = bytes(message.payload)
                self._wake.set()
        elif message.topic.endswith("/cmd"):
            try:
                cmd = json.loads(message.payload).get("cmd")
            except (ValueError, AttributeError):
                cmd = None
            self._command(cmd, f"{self._root}/cmd")

    def report(self) -> None:
        """Publish the reported state (retained) when connected."""
        client = self._client
        if client is None:
            return
        self._shown = self._units_now()
        with contextlib.suppress(Exception):  # a connection closing under us: the next attach reports
            if self._twin is not None:  # the twin's reported property; the CSR rides in it
                pending = self._renewal is not None and self._renewal.pending
                csr = self._renewal.csr.read_text() if self._renewal is not None and pending else None
                self._twin.report({**self.reported(), "csr": csr})
                return
            client.publish(f"{self._root}/reported", json.dumps(self.reported()).encode(), qos=1, retain=True)

    def reported(self) -> dict[str, Any]:
        """The reported state: what runs, what is pending, what was refused and why, the audit head.

        Sources are named by pseudonym, and a text that still holds an identity is withheld
        (counted in ``withheld``; :mod:`gateway.downlink.public`).
        """
        st = self.state
        head = self.audit.head if self.audit is not None else None
        label = self._anon.source_label
        applied = None if st.applied is None else {**st.applied}
        if applied is not None and applied.get("restarted"):
            applied["restarted"] = public.units(applied["restarted"], label)
        doc = {
            "phase": self.phase,
            "applied": applied,
            "accepted": st.accepted,
            "pending": None if st.pending is None else {"version": st.pending.version},
            "refused": [_public_refusal(r, label) for r in st.refused[-3:]],
            "last_rollback": _public_rollback(st.last_rollback, label),
            "audit": None if head is None else {"count": head.count, "head": head.hash},
            "trust": {"version": st.trust_version, "keys": self._trust_keys()},
            "certificate": self._certificate(),
            "units": {public.unit(name, label): state for name, state in self._units_now().items()},
            "models": None if self.bundles is None else self.bundles.reported(),
            "process": {"started_at": self._started_at, "connects": self._attaches},
        }
        safe, found = public.withhold(doc, self._anon.holds_identity)
        if found:
            self.withheld += found
            if self.withheld == found or self.withheld // 1000 != (self.withheld - found) // 1000:
                # Never the text itself: the log may leave the gateway too.
                log.error(
                    "downlink: %d text(s) of the reported state held an identity and were sent as %r "
                    "(withheld so far: %d): name sources, slots and files without ids",
                    found,
                    public.WITHHELD,
                    self.withheld,
                )
        return {**safe, "withheld": self.withheld}

    # --- the unit -------------------------------------------------------------------------------

    async def run(self, started: Callable[[], None]) -> None:
        """Load trust and state, finish a pending apply, then handle desired states as they come."""
        trust_file = self._section.trust_file
        if trust_file is None:
            raise RuntimeError("downlink: started without downlink.trust_file")
        self.quarantine.mkdir(parents=True, exist_ok=True, mode=0o700)
        for left in self.quarantine.iterdir():  # unverified leftovers of a run that ended mid-way
            if left.is_file():  # (chunks/: hash-checked chunks of a model transfer, resumed)
                left.unlink(missing_ok=True)
        self.state = persist.load(self._state_path)
        # A trust set rotated over the air replaces the configured one (delete it to go back).
        rotated = self.dir / "trust.json"
        self._trust = await asyncio.to_thread(Trust.load, rotated if rotated.exists() else trust_file)
        self.audit = AuditLog(self.dir / "audit.jsonl")
        if self.bundles is not None:
            await asyncio.to_thread(self.bundles.load)
        started()
        pending = self.state.pending
        if pending is not None and pending.applied_by == "units":
            # Stopped while it was on probation in place: this start runs on all of it.
            pending.applied_by, pending.restarted = "process", ["stopped during its probation"]
        if pending is not None and not await self._probation():
            await asyncio.Event().wait()  # rolling back: the supervisor stops the gateway
        self.phase = "running"
        self.report()
        while True:
            # Unit states are reported when they change (checked each second), not on each poll.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_REPORT_EVERY_S):
                    await self._wake.wait()
            if cancel_requested():  # a cancellation swallowed with the time-out (Python 3.11)
                raise asyncio.CancelledError
            if self._units_now() != self._shown:
                self.report()
            await self._renew_tick()
            if self._twin is not None:
                self._twin.tick(time.monotonic())
            woken = self._wake.is_set()
            self._wake.clear()
            await self._bundle_step()  # also when not woken: the slots' shadow outcomes
            if not woken:
                continue
            cert, self._cert = self._cert, None
            if cert is not None:
                await self._take_certificate(cert)
            rotation, self._rotation = self._rotation, None
            if rotation is not None:
                await self._rotate(rotation)
            data, self._desired = self._desired, None
            if data is not None and await self._handle(data):
                await asyncio.Event().wait()  # restarting onto the new config: the supervisor stops us

    # --- model bundles (gateway.downlink.bundles) --------------------------------------------------

    async def _bundle_step(self) -> None:
        """Take manifests and chunks that came, and the shadow outcomes the slots decided."""
        if self.bundles is None or self.audit is None or self._trust is None:
            return
        if await self.bundles.step(self._trust, self.audit, self._refuse_bundle):
            self.report()

    async def _refuse_bundle(self, digest: str, version: int | None, reason: str, detail: str) -> None:
        self._digest = digest
        await self._refuse(version, reason, detail)

    # --- certificate renewal ----------------------------------------------------------------------

    def _publish_csr(self) -> None:
        assert self._renewal is not None
        client = self._client
        if client is None:
            return
        if self._azure:
            self.report()  # in the reported property
            return
        with contextlib.suppress(Exception):
            client.publish(f"{self._root}/csr", self._renewal.csr.read_bytes(), qos=1, retain=True)

    async def _renew_tick(self) -> None:
        """Make a CSR when the certificate is due; judge a new pair on trial."""
        r = self._renewal
        if r is None or not r.enabled or self.audit is None:
            return
        now = time.monotonic()
        if r.on_trial:
            if self._trial_until is None:  # installed by an earlier run: judge it from now
                self._trial_until, self._attach_mark = now + self._section.apply_deadline_s, 0
            if self._attaches > self._attach_mark and getattr(self._uplink, "connected", False):
                r.forget_previous()
                self._trial_until = None
                await asyncio.to_thread(
                    self.audit.append,
                    "cert-connected",
                    detail="the new certificate connected: the old pair removed",
                )
                log.info("downlink: the renewed certificate connected; the old pair is removed")
                self.report()
            elif now >= self._trial_until:
                await asyncio.to_thread(r.restore)  # four files written and synced: off the loop
                self._trial_until = None
                detail = f"the new certificate did not connect within {self._section.apply_deadline_s:g} s"
                await asyncio.to_thread(self.audit.append, "cert-rolled-back", detail=detail)
                log.warning("downlink: %s: the old pair is back", detail)
                self._reconnect()
            return
        if r.pending or now < self._next_renew_check:
            return
        self._next_renew_check = now + _RENEW_CHECK_S
        step = r.clock.step_s
        try:
            left = r.days_left(r.now())
        except (EdgetwinError, OSError) as exc:  # missing or unreadable: the uplink says so; look again later
            log.debug("downlink: certificate expiry not known: %s", exc)
            return
        if r.clock.step_s != step:  # a wall-clock step seen or over: the twin hears of it
            self.report()
        if left > self._section.renew_before_days:
            # Hourly, and more often as the moment nears (half the time left each time), so a
            # short-lived certificate is renewed on time and a clock step is seen before it.
            due_s = (left - self._section.renew_before_days) * 86400.0
            self._next_renew_check = now + min(_RENEW_CHECK_S, max(due_s / 2, _REPORT_EVERY_S))
            return
        r.make_csr()
        await asyncio.to_thread(
            self.audit.append, "csr-made", detail=f"the certificate has {left:.1f} days left"
        )
        log.info("downlink: client certificate has %.1f days left: CSR sent to the twin", left)
        self._publish_csr()
        self.report()

    async def _take_certificate(self, pem: bytes) -> None:
        """Install a signed certificate for the pending key, or refuse it."""
        r = self._renewal
        assert self.audit is not None
        digest = self._digest = hashlib.sha256(pem).hexdigest()
        if r is None or digest in _seen(self.dir):
            return
        await asyncio.to_thread(
            self.audit.append, "received", detail=f"certificate, {len(pem)} bytes", sha256=digest
        )
        try:
            cert = r.check(pem, r.now())
        except RefusedError as exc:
            await self._refuse(None, exc.reason, f"certificate: {exc}")
            return
        await asyncio.to_thread(r.install, pem)  # four files written and synced: off the loop
        await asyncio.to_thread(_remember, self.dir, digest)
        self._trial_until = time.monotonic() + self._section.apply_deadline_s
        self._attach_mark = self._attaches
        await asyncio.to_thread(
            self.audit.append,
            "cert-installed",
            detail=f"serial {cert.serial_number:x}, valid until {cert.not_valid_after_utc:%Y-%m-%d}",
        )
        log.info(
            "downlink: renewed certificate installed (valid until %s): reconnecting", cert.not_valid_after_utc
        )
        self._reconnect()

    def _reconnect(self) -> None:
        """End the connection: the uplink connects again with the files now in place."""
        client = self._client
        if client is not None:
            with contextlib.suppress(Exception):
                client.disconnect()

    def _trust_keys(self) -> list[str]:
        trust = self._trust
        return [] if trust is None else sorted(k[:12] for k in trust.keys if k not in trust.revoked)

    def _certificate(self) -> dict[str, Any] | None:
        r = self._renewal
        if r is None or not r.enabled:
            return None
        try:
            left = round(r.days_left(r.now()), 2)
        except Exception:  # noqa: BLE001 - a certificate that does not load is the uplink's to report
            left = None
        renewal = "on trial" if r.on_trial else "csr sent" if r.pending else None
        step = r.clock.step_s
        return {"days_left": left, "renewal": renewal, "clock_step_s": None if step is None else round(step)}

    def _units_now(self) -> dict[str, str]:
        return {u.name: str(u.state) for u in self._sup.units}

    # --- receiving ------------------------------------------------------------------------------

    async def _handle(self, data: bytes) -> bool:
        """Verify, stage, check and apply one desired state; True when the gateway restarts for it."""
        audit, st = self.audit, self.state
        assert audit is not None
        assert self._trust is not None
        digest = self._digest = hashlib.sha256(data).hexdigest()
        if digest in _seen(self.dir):
            return False  # the retained message again, after a reconnect: handled before
        held = self.quarantine / f"{digest[:16]}.envelope"
        if len(data) <= MAX_ENVELOPE_BYTES:  # a larger one is refused unwritten
            await asyncio.to_thread(persist.write_atomic, held, data)
        try:
            found = verify(
                data,
                self._trust,
                gateway=self.gateway_id,
                accepted_version=st.accepted,
                now=dt.datetime.now(dt.UTC),
            )
        except RefusedError as exc:
            held.unlink(missing_ok=True)
            if not self._quiet_repeat(exc):
                await asyncio.to_thread(audit.append, "received", detail=f"{len(data)} bytes", sha256=digest)
                await self._refuse(None, exc.reason, self._with_repeats(str(exc)))
            return False
        held.unlink(missing_ok=True)
        await asyncio.to_thread(audit.append, "received", detail=f"{len(data)} bytes", sha256=digest)
        await asyncio.to_thread(
            audit.append,
            "verified",
            version=found.version,
            keys=[k[:12] for k in found.keyids],
            sha256=found.sha256,
        )
        return await self._apply(found)

    async def _rotate(self, data: bytes) -> None:
        """Take a new trust set signed by the current keys and its own, or refuse it."""
        assert self.audit is not None
        assert self._trust is not None
        st = self.state
        digest = self._digest = hashlib.sha256(data).hexdigest()
        if digest in _seen(self.dir):
            return
        held = self.quarantine / f"{digest[:16]}.trust"
        if len(data) <= MAX_ENVELOPE_BYTES:  # a larger one is refused unwritten
            await asyncio.to_thread(persist.write_atomic, held, data)
        try:
            found, new = verify_rotation(
                data,
                self._trust,
                gateway=self.gateway_id,
                accepted_version=st.trust_version,
                now=dt.datetime.now(dt.UTC),
            )
        except RefusedError as exc:
            if not self._quiet_repeat(exc):
                await asyncio.to_thread(
                    self.audit.append, "received", detail=f"trust set, {len(data)} bytes", sha256=digest
                )
                await self._refuse(None, exc.reason, self._with_repeats(f"trust set: {exc}"))
            return
        finally:
            held.unlink(missing_ok=True)
        await asyncio.to_thread(
            self.audit.append, "received", detail=f"trust set, {len(data)} bytes", sha256=digest
        )
        await asyncio.to_thread(persist.write_atomic, self.dir / "trust.json", found.content)
        self._trust = new
        st.trust_version = found.version
        await asyncio.to_thread(persist.save, self._state_path, st)
        await asyncio.to_thread(_remember, self.dir, digest)
        kept = sorted(k[:12] for k in new.keys if k not in new.revoked)
        await asyncio.to_thread(
            self.audit.append, "trust-rotated", version=found.version, keys=kept, threshold=new.threshold
        )
        log.info("downlink: trust set v%d taken: keys %s, threshold %d", found.version, kept, new.threshold)
        self.report()

    def _quiet_repeat(self, exc: RefusedError) -> bool:
        """True for a malformed payload refused just as the one before: logged, not recorded again.

        Distinct garbage payloads would otherwise each cost an audit entry and two fsynced writes;
        one in :data:`_QUIET_REPEATS` is still recorded, with the count of those in between.
        """
        key = (exc.reason, str(exc))
        if exc.reason not in ("malformed", "too-large") or key != self._last_refusal:
            self._last_refusal = key if exc.reason in ("malformed", "too-large") else None
            self._repeats = 0
            return False
        self._repeats += 1
        if self._repeats >= _QUIET_REPEATS:
            return False
        log.debug("downlink: desired state refused again: %s: %s", exc.reason, exc)
        return True

    def _with_repeats(self, detail: str) -> str:
        if self._repeats:
            detail = f"{detail} (refused the same way {self._repeats} time(s) since the last record)"
            self._repeats = 0
        return detail

    async def _refuse(self, version: int | None, reason: str, detail: str) -> None:
        assert self.audit is not None
        log.warning(
            "downlink: desired state%s refused: %s: %s", f" v{version}" if version else "", reason, detail
        )
        await asyncio.to_thread(self.audit.append, "refused", version=version, reason=reason, detail=detail)
        self.state.refuse(version, reason, detail, _now())
        await asyncio.to_thread(persist.save, self._state_path, self.state)
        await asyncio.to_thread(_remember, self.dir, self._digest)
        self.report()

    async def _apply(self, found: Verified) -> bool:
        """Stage and check the new config, write it in place, restart the units it changes (or the process).

        True when the whole process restarts onto it; False when it was refused or applied (or
        rolled back) in place.
        """
        assert self.audit is not None
        st, version = self.state, found.version
        st.accepted = version  # verified: never taken again, whatever happens next
        staged_dir = self.dir / "staged"
        staged_dir.mkdir(exist_ok=True, mode=0o700)
        for old in staged_dir.iterdir():  # the newest revision only: earlier ones are in the audit log
            old.unlink(missing_ok=True)
        staged = staged_dir / f"config-v{version}.toml"
        await asyncio.to_thread(persist.write_atomic, staged, found.content)
        try:
            problems, new = await asyncio.to_thread(self._check, staged)
        except Exception as exc:  # noqa: BLE001 - a driver's check that breaks refuses the revision, not the unit
            problems, new = f"the checks themselves failed: {type(exc).__name__}: {exc}", None
        if problems or new is None:
            await self._refuse(version, "invalid-config", problems or "the staged file did not load")
            return False
        live = self._config.file
        todo = plan(self._config, new) if self.sources is not None else Plan(("in-place restarts off",))
        if todo.uplink and getattr(self._uplink, "retarget", None) is None:
            todo = Plan(("uplink",))
        restarted = todo.units if todo.in_place else list(todo.process)
        backup = self.dir / "previous.toml"
        excused = [
            u.name for u in self._sup.units if not _healthy(u, time.monotonic()) and u.name != "downlink"
        ]
        by = "units" if todo.in_place else "process"
        try:
            # The backup on disk (fsynced) and the pending revision saved before the live file is
            # replaced: a power cut at any point leaves a state that a start rolls back or runs on.
            await asyncio.to_thread(_write_backup, live, backup)
            st.pending = persist.Pending(version, found.sha256, str(backup), excused, 0, by, restarted)
            await asyncio.to_thread(persist.save, self._state_path, st)
            await asyncio.to_thread(_remember, self.dir, self._digest)
            await asyncio.to_thread(persist.write_atomic, live, found.content, live.stat().st_mode & 0o777)
        except OSError as exc:
            st.pending = None
            await self._refuse(
                version,
                "cannot-write-config",
                f"{live}: {exc.strerror}: the service must own the file and may write its directory "
                "(systemd/README.md, 'Config revisions')",
            )
            return False
        what = (
            f"restarting {', '.join(restarted) or 'no unit'} in place"
            if todo.in_place
            else f"restarting the process for {', '.join(restarted)}"
        )
        await asyncio.to_thread(
            self.audit.append,
            "applying",
            version=version,
            detail=f"written to {live}; {what}",
            excused=excused,
            applied_by=by,
            restarted=restarted,
        )
        self.phase = "applying"
        self.report()
        log.info("downlink: config v%d written to %s: %s", version, live, what)
        if not todo.in_place:
            restart.request(f"config v{version}")
            self._sup.request_stop()
            return True
        self._undo = (todo, self._config)
        try:
            try:
                await self.sources.apply(todo, new)
            except (
                Exception
            ) as exc:  # a driver that breaks while built: the revision rolls back, not the unit
                log.exception("downlink: config v%d: starting %s failed", version, ", ".join(todo.units))
                assert st.pending is not None
                await self._rollback(
                    st.pending, f"starting failed: {type(exc).__name__}: {exc}", "unhealthy", todo.units
                )
            else:
                self._config, self._section = replace(new, file=live), new.core.downlink
                if todo.uplink:  # last: the sources run on the new settings before the way home changes
                    self._retarget(new)
                await self._probation()
        finally:
            self._undo = self._uplink_mark = None
        self.phase = "running"
        self.report()
        return False

    def _retarget(self, config: Config) -> None:
        """Reconnect the uplink with the ``[uplink.mqtt]`` connection keys of ``config``."""
        mqtt = config.core.uplink.mqtt
        assert mqtt is not None
        self._uplink_mark = self._attaches
        self._uplink.retarget(mqtt)
        log.info("downlink: uplink reconnecting to %s:%d", mqtt.host, mqtt.port)
        self._reconnect()

    def _check(self, staged: Path) -> tuple[str, Config | None]:
        """The failures ``edgetwin check`` finds in the staged file (offline), or "", and the config it loaded."""
        from gateway.downlink.checks import trust_findings  # noqa: PLC0415
        from gateway.observe.check import OFFLINE_CHECKS, run_check  # noqa: PLC0415 - only when one comes

        report = run_check(staged, self._registry)
        if report.config is not None and trust_findings not in OFFLINE_CHECKS:
            report.findings += trust_findings(report.config)
        lines = [" ".join(f.render().split()) for f in report.failures]
        core = report.config.core if report.config is not None else None
        if core is not None and core.gateway.state_dir != self._config.core.gateway.state_dir:
            lines.append(
                f"gateway.state_dir: {core.gateway.state_dir} differs from {self._config.core.gateway.state_dir}: "
                "a revision cannot move the state directory (the outbox, keys and this log live there)"
            )
        if core is not None and core.downlink.trust_file is None:
            lines.append("downlink.trust_file: missing: the gateway would stop listening to the twin")
        return "; ".join(lines), report.config

    # --- probation after a restart onto a new config --------------------------------------------

    async def _probation(self) -> bool:
        """Wait for READY with the required units healthy; False (rolling back) when the deadline passes."""
        assert self.audit is not None
        st, pending = self.state, self.state.pending
        assert pending is not None
        pending.starts += 1
        await asyncio.to_thread(persist.save, self._state_path, st)
        self.phase = "probation"
        live = await asyncio.to_thread(self._config.file.read_bytes)
        if hashlib.sha256(live).hexdigest() != pending.sha256:
            # Stopped after the revision was recorded as pending and before the file was replaced.
            await self._rollback(
                pending, "the revision was not written in place before the gateway stopped", "not-written", []
            )
            return False
        deadline_s, settle_s = self._section.apply_deadline_s, self._section.settle_s
        end = time.monotonic() + deadline_s
        healthy_since: float | None = None
        why = f"crashed or was stopped {pending.starts - 1} time(s) on it"
        cause, units = "crash-loop", list[str]()
        while pending.starts <= MAX_STARTS_ON_PENDING and (now := time.monotonic()) < end:
            if self._stopping(pending):
                return False
            why, cause, units = self._unhealthy(pending, now)
            if why:
                healthy_since = None
            elif healthy_since is None:
                healthy_since = now
            elif now - healthy_since >= settle_s:
                st.applied = {
                    "version": pending.version,
                    "sha256": pending.sha256,
                    "at": _now(),
                    "applied_by": pending.applied_by,
                    "restarted": list(pending.restarted),
                }
                st.pending = None
                await asyncio.to_thread(persist.save, self._state_path, st)
                await asyncio.to_thread(
                    self.audit.append,
                    "applied",
                    version=pending.version,
                    detail=f"READY, units healthy, broker reached ({pending.applied_by}: "
                    f"{', '.join(pending.restarted) or 'nothing restarted'})",
                )
                log.info(
                    "downlink: config v%d applied by restarting %s: READY with every unit healthy",
                    pending.version,
                    ", ".join(pending.restarted) or "no unit"
                    if pending.applied_by == "units"
                    else f"the process ({', '.join(pending.restarted)})",
                )
                return True
            await asyncio.sleep(_POLL_S)
        await self._rollback(pending, why or "not healthy long enough", cause if why else "unhealthy", units)
        return False

    def _unhealthy(self, pending: persist.Pending, now: float) -> tuple[str, str, list[str]]:
        """Why the gateway is not yet healthy on the new config ("" when it is), the cause, the unit names.

        The text (errors, host names, device paths) is for the log and the audit file; the cause
        (one of :data:`ROLLBACK_CAUSES`) and the names are what the reported state carries.
        """
        if not self._sup.ready:
            return "not READY", "not-ready", []
        failing = [
            u
            for u in self._sup.units
            if u.name != "downlink" and u.name not in pending.excused and not _healthy(u, now)
        ]
        bad = [f"{u.name} {u.state}{': ' + u.last_error if u.last_error else ''}" for u in failing]
        names = [u.name for u in failing]
        cause = "unhealthy"
        if self._uplink_mark is not None and self._attaches <= self._uplink_mark:
            bad.append(f"uplink not connected with the new settings ({getattr(self._uplink, 'problem', '')})")
            names.append("uplink")
            cause = cause if failing else "uplink"
        elif getattr(self._uplink, "connected", True) is False:
            bad.append(f"uplink not connected to the broker ({getattr(self._uplink, 'problem', '')})")
            names.append("uplink")
            cause = cause if failing else "uplink"
        return "; ".join(bad), cause, names

    def _stopping(self, pending: persist.Pending) -> bool:
        """True once the gateway is stopping: its units stopped by the stop, not the revision; not judged.

        The revision stays pending: the next start judges it (and rolls it back if it fails there).
        """
        if not getattr(self._sup, "stopping", False):
            return False
        log.info("downlink: config v%d: the gateway is stopping; the next start judges it", pending.version)
        return True

    async def _rollback(self, pending: persist.Pending, why: str, cause: str, units: list[str]) -> None:
        """Restore the previous config file and put the previous settings back (in place, or by a process restart)."""
        assert self.audit is not None
        if self._stopping(pending):
            return
        detail = f"not healthy within {self._section.apply_deadline_s:g} s: {why}"
        await asyncio.to_thread(
            roll_back, self._config.file, self.dir, self.state, self.audit, detail, cause=cause, units=units
        )
        if self._undo is not None:  # applied in place: the previous settings of those units, in place
            todo, old = self._undo
            assert self.sources is not None
            try:
                if todo.uplink and self._uplink_mark is not None:  # retargeted already
                    self._retarget(old)
                await self.sources.apply(todo.reverse(), old)
            except Exception as exc:  # the old file is back on disk: a restart runs on it
                log.error(
                    "downlink: config v%d: putting %s back in place failed: %s: %s; restarting the "
                    "process on the previous config",
                    pending.version,
                    ", ".join(todo.units) or "the uplink",
                    type(exc).__name__,
                    exc,
                    exc_info=exc,
                )
            else:
                self._config, self._section = old, old.core.downlink
                log.info(
                    "downlink: config v%d: %s back on the previous settings",
                    pending.version,
                    ", ".join(todo.units),
                )
                return
        self.phase = "rolling back"
        self.report()
        restart.request(f"rollback of config v{pending.version}")
        self._sup.request_stop()


def roll_back(
    live: Path,
    directory: Path,
    st: persist.DownlinkState,
    audit: AuditLog,
    detail: str,
    *,
    cause: str,
    units: list[str] | None = None,
) -> None:
    """Put the config file from before the pending revision back, and record why.

    ``detail`` is the full text (log, audit file, state file); ``cause`` (one of
    :data:`ROLLBACK_CAUSES`) and ``units`` (names) are what the reported state carries.  A missing
    or empty backup is refused with a ConfigError: the live file is left as it is.
    """
    pending = st.pending
    assert pending is not None
    backup = Path(pending.backup)
    try:
        previous = backup.read_bytes()
    except OSError as exc:
        raise _no_backup(pending.version, backup, exc.strerror or type(exc).__name__) from exc
    if not previous.strip():
        raise _no_backup(pending.version, backup, "empty")
    persist.write_atomic(live, previous, live.stat().st_mode & 0o777)
    log.warning("downlink: config v%d rolled back: %s", pending.version, detail)
    st.pending = None
    names = list(units or [])
    st.last_rollback = {
        "version": pending.version,
        "reason": cause,
        "units": names,
        "detail": detail,
        "at": _now(),
    }
    st.refuse(pending.version, "rolled-back", detail, _now(), units=names)
    persist.save(directory / "state.json", st)
    audit.append("rolled-back", version=pending.version, detail=detail)


def roll_back_after_exit(config: Config, code: int) -> bool:
    """After ``edgetwin run`` ended with ``code`` on a revision still on probation: roll it back.

    A revision that passed the checks and still ends the process before probation could judge it
    (a failure at start) must not leave the gateway down; True when the previous file is back.
    """
    from gateway.observe.lock import StateDirBusyError, state_dir_lock  # noqa: PLC0415

    state_dir = config.core.gateway.state_dir
    directory = state_dir / "downlink"
    try:
        # Only the gateway that owns the state directory judges: a second 'edgetwin run' refused
        # for a busy state directory must not roll back the running gateway's revision.
        with state_dir_lock(state_dir):
            st = persist.load(directory / "state.json")
            if st.pending is None:
                return False
            detail = f"the gateway exited with code {code} on it before it could be judged"
            roll_back(config.file, directory, st, AuditLog(directory / "audit.jsonl"), detail, cause="exited")
    except StateDirBusyError:
        return False
    except ConfigError as exc:  # no backup to go back to: the exit code stands, the log says why
        log.error("%s", exc)
        return False
    return True


def _no_backup(version: int, backup: Path, why: str) -> ConfigError:
    return ConfigError(
        f"downlink: cannot roll back config v{version}: the previous config file {backup} is {why}: "
        "the live config file is left as it is: restore it by hand (edgetwin check), then delete "
        "'pending' from the downlink's state.json"
    )


def _write_backup(live: Path, backup: Path) -> None:
    """Copy the live config file to ``backup``, fsynced and renamed into place."""
    data = live.read_bytes()
    if not data.strip():
        raise OSError(0, "the live config file is empty: nothing to roll back to")
    persist.write_atomic(backup, data)


def _public_refusal(entry: Mapping[str, Any], label: Callable[[str], str]) -> dict[str, Any]:
    """A refusal as reported: reason word and units (sources by pseudonym); details name devices and hosts."""
    out = {"version": entry.get("version"), "reason": entry.get("reason"), "at": entry.get("at")}
    if entry.get("units"):
        out["units"] = public.units(entry["units"], label)
    return out


def _public_rollback(entry: Mapping[str, Any] | None, label: Callable[[str], str]) -> dict[str, Any] | None:
    """The newest rollback as reported: its cause word and units (sources by pseudonym), not the text."""
    if entry is None:
        return None
    reason = entry.get("reason")
    return {
        "version": entry.get("version"),
        "reason": reason if reason in ROLLBACK_CAUSES else "rolled-back",  # a free text from before
        "units": public.units(entry.get("units") or [], label),
        "at": entry.get("at"),
    }


def _config_anonymizer(config: Config) -> Anonymizer:
    """An anonymizer under the site key that knows the config's identities (a downlink built alone)."""
    from gateway.runtime import driver_identities  # noqa: PLC0415 - the runtime imports this module

    core = config.core
    known = [core.gateway.name]
    for e in config.sources:
        known += [e.info.name, e.info.subject, *driver_identities(e.config)]
    return Anonymizer(
        Pseudonymizer(load_or_create_key(core.site_key_path)),
        time_mode=core.privacy.time,
        local_identities=known,
    )


def _healthy(unit: Any, now: float) -> bool:
    return bool(unit.state == UnitState.RUNNING and unit.stale_reason(now) is None)


_SEEN_KEPT = 16


def _seen(directory: Path) -> list[str]:
    try:
        return list(json.loads((directory / "seen.json").read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return []


def _remember(directory: Path, digest: str) -> None:
    seen = [*_seen(directory), digest][-_SEEN_KEPT:]
    persist.write_atomic(directory / "seen.json", json.dumps(seen).encode())
