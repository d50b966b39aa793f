"""Pushing a signed firmware image to a node: verify, transfer (resumable), reboot, commit or roll back.

The gateway refuses before sending what it can check itself (signature, hash, size, target,
downgrade); the node checks again (hash always, signature when it has a vetted Ed25519).  The
new image boots in trial; it is committed only after the node comes back and reports a
healthy self-test.  A node that does not is left alone: its own watchdog reboots it into the
previous image, and the push reports the rollback.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from drivers.mcu.link import Link, NodeRefusedError
from firmware_bridge.manifest import ImageRejectedError, SignedManifest, verify_image
from firmware_bridge.messages import (
    MAX_CHUNK,
    BeginReply,
    BootState,
    Cap,
    Health,
    Hello,
    MessageError,
    MsgType,
    NackCode,
    begin_body,
    chunk_body,
    decode_u32,
    format_version,
    reboot_body,
)
from gateway.errors import ConfigError, TransientError

_LOGGER = logging.getLogger(__name__)

_POLL_TIMEOUT_S = 0.3  # one hello request while waiting for the node to boot
_VERIFY_TIMEOUT_S = 10.0  # hashing a whole slot takes a while on a small MCU
_MAX_REBOOT_REQUESTS = 3


class UpdateRefusedError(ConfigError):
    """The update cannot be done as asked (wrong board, downgrade, node state); ``reason`` says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # "target", "downgrade", "size", "capability", "trial_pending", "node"


@dataclass(frozen=True, slots=True)
class PushResult:
    """How a push ended."""

    outcome: str  # "committed", "up_to_date" or "rolled_back"
    node_id: str
    from_version: int
    to_version: int
    running_version: int  # what the node runs at the end
    resumed_at: int  # offset the transfer started from (> 0 after an interruption)
    sent_bytes: int
    seconds: float


async def node_hello(link: Link, *, timeout_s: float | None = None, retries: int | None = None) -> Hello:
    """Ask the node who it is."""
    body = await link.request(MsgType.HELLO_REQ, timeout_s=timeout_s, retries=retries)
    try:
        return Hello.decode(body)
    except MessageError as exc:
        raise TransientError(
            f"{link.who} port {link.path}: malformed hello: {exc}: check the node firmware"
        ) from exc


def _refusal(exc: NodeRefusedError, what: str) -> Exception:
    """The error a NACK from the node turns into."""
    code = exc.code
    if code == NackCode.BAD_SIGNATURE:
        return ImageRejectedError(
            "signature", f"{what}: the node refused the signature: sign with the key the node trusts"
        )
    if code == NackCode.HASH_MISMATCH:
        return ImageRejectedError(
            "hash",
            f"{what}: the node computed a different sha256 of the received image: the image or the transfer was altered",
        )
    if code == NackCode.DOWNGRADE:
        return UpdateRefusedError(
            "downgrade",
            f"{what}: the node refuses versions below {format_version(exc.detail)} (anti-rollback)",
        )
    if code == NackCode.WRONG_TARGET:
        return UpdateRefusedError("target", f"{what}: the node says the image is for another board")
    if code == NackCode.TOO_LARGE:
        return UpdateRefusedError(
            "size", f"{what}: the image does not fit the node's slot of {exc.detail} bytes"
        )
    if code == NackCode.BAD_STATE:
        return UpdateRefusedError("trial_pending", f"{what}: the node is not in a state to accept it: {exc}")
    return UpdateRefusedError("node", f"{what}: {exc}")


async def push_firmware(
    link: Link,
    image: bytes,
    signed: SignedManifest,
    public_key: bytes,
    *,
    health_timeout_s: float = 30.0,
    force: bool = False,
    chunk_size: int = MAX_CHUNK,
    verify_locally: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> PushResult:
    """Install ``image`` on the node behind ``link``; see the module docstring for the steps.

    Raises ImageRejectedError (signature, hash), UpdateRefusedError (target, downgrade, state) or
    TransientError (link trouble: run it again, the transfer resumes).
    """
    started = time.monotonic()
    m = signed.manifest
    what = f"firmware {format_version(m.version)} for {m.target}"
    if verify_locally:
        verify_image(image, signed, public_key)
    hello = await node_hello(link)
    old = hello.fw_version

    def result(outcome: str, running: int, resumed: int = 0, sent: int = 0) -> PushResult:
        return PushResult(
            outcome, hello.node_id, old, m.version, running, resumed, sent, time.monotonic() - started
        )

    if not hello.caps & Cap.FW_UPDATE:
        raise UpdateRefusedError(
            "capability", f"{what}: node {hello.node_id} does not accept firmware updates"
        )
    if m.target != hello.target:
        raise UpdateRefusedError(
            "target",
            f"{what}: node {hello.node_id} is a {hello.target!r} board: build and sign the image for it",
        )
    if hello.boot_state == BootState.TRIAL:
        if hello.fw_version == m.version and hello.health == Health.OK:
            # A push was interrupted after the reboot: finish it.
            await link.request(MsgType.FW_COMMIT)
            _LOGGER.info("%s: committed the healthy trial image %s", link.who, format_version(m.version))
            return result("committed", m.version)
        raise UpdateRefusedError(
            "trial_pending",
            f"{what}: node {hello.node_id} runs an uncommitted trial image {format_version(hello.fw_version)}: "
            "wait for it to roll back, then push again",
        )
    if m.version < hello.fw_version:
        raise UpdateRefusedError(
            "downgrade",
            f"{what}: node {hello.node_id} runs {format_version(hello.fw_version)}: "
            "a lower version is refused (anti-rollback): sign a higher version",
        )
    if m.version == hello.fw_version and not force:
        return result("up_to_date", old)

    try:
        begin = BeginReply.decode(await link.request(MsgType.FW_BEGIN, begin_body(m, signed.signature)))
    except NodeRefusedError as exc:
        raise _refusal(exc, what) from exc
    resumed = begin.resume_offset
    if resumed:
        _LOGGER.info("%s: resuming %s at byte %d of %d", link.who, what, resumed, m.size)
    size = max(1, min(chunk_size, begin.chunk_max, MAX_CHUNK))
    offset = resumed
    sent = 0
    while offset < m.size:
        data = image[offset : offset + size]
        try:
            nxt = decode_u32(await link.request(MsgType.FW_CHUNK, chunk_body(offset, data)))
        except NodeRefusedError as exc:
            if exc.code == NackCode.BAD_OFFSET and exc.detail <= m.size:
                offset = exc.detail  # the node knows better where it stands
                continue
            raise _refusal(exc, what) from exc
        sent += len(data)
        if not offset < nxt <= m.size:
            raise TransientError(
                f"{link.who}: node acknowledged offset {nxt} after {offset}: restarting the push"
            )
        offset = nxt
        if progress is not None:
            progress(offset, m.size)
    try:
        await link.request(MsgType.FW_VERIFY, timeout_s=max(link.timeout_s, _VERIFY_TIMEOUT_S))
    except NodeRefusedError as exc:
        raise _refusal(exc, what) from exc
    _LOGGER.info("%s: %s transferred and verified by the node, rebooting it into trial", link.who, what)

    deadline = time.monotonic() + health_timeout_s
    reboots = 0
    need_reboot = True
    failed_reported = False
    while time.monotonic() < deadline:
        if need_reboot:
            if reboots >= _MAX_REBOOT_REQUESTS:
                raise TransientError(f"{link.who}: node does not reboot into the new image: check the node")
            reboots += 1
            need_reboot = False
            try:
                # No retransmission: a repeated REBOOT reaching a node already in trial would roll it back.
                await link.request(MsgType.REBOOT, reboot_body(0), retries=0)
            except TransientError:
                link.check()
        try:
            now = await node_hello(link, timeout_s=_POLL_TIMEOUT_S, retries=0)
        except TransientError:
            link.check()
            continue
        if now.boot_state == BootState.TRIAL and now.fw_version == m.version:
            if now.health == Health.OK:
                try:
                    version = decode_u32(await link.request(MsgType.FW_COMMIT))
                except NodeRefusedError as exc:
                    raise _refusal(exc, what) from exc
                _LOGGER.info("%s: node healthy on %s: committed", link.who, format_version(version))
                return result("committed", version, resumed, sent)
            if now.health == Health.FAILED and not failed_reported:
                failed_reported = True
                _LOGGER.warning(
                    "%s: %s failed its self-test: not committing; the node rolls back", link.who, what
                )
        elif now.boot_state == BootState.ROLLED_BACK:
            _LOGGER.warning(
                "%s: node rolled back to %s: %s did not prove healthy",
                link.who,
                format_version(now.fw_version),
                what,
            )
            return result("rolled_back", now.fw_version, resumed, sent)
        elif now.fw_version == old and now.boot_state == BootState.CONFIRMED:
            need_reboot = True  # the reboot request was lost: the node still runs the old image
    raise TransientError(
        f"{link.who}: {what}: the node did not come back healthy within {health_timeout_s:g} s: "
        "it rolls back by itself if the image is bad; check it with 'edgetwin firmware status'"
    )
