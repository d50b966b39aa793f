"""Firmware updates against the simulated node over a pty: success, resume, refusals, rollback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from peers import LoggedProcess, RecordingSink, running_driver

from drivers.mcu.config import McuConfig, SimNodeConfig
from drivers.mcu.driver import McuDriver, factory
from drivers.mcu.link import Link, NodeRefusedError
from drivers.mcu.simnode import RunningSimNode, run_sim_node
from drivers.mcu.update import PushResult, UpdateRefusedError, node_hello, push_firmware
from firmware_bridge.manifest import (
    SIM_FLAG_SELFTEST_FAIL,
    SIM_FLAG_SILENT,
    SIM_TARGET,
    ImageRejectedError,
    SignedManifest,
    generate_key,
    load_private_key,
    make_sim_image,
    manifest_path_for,
    sign_image,
)
from firmware_bridge.messages import BootState, Cap, Health, MsgType, NackCode, begin_body, parse_version
from gateway.cli import main as edgetwin
from gateway.contracts import SourceInfo
from gateway.errors import TransientError

pytestmark = pytest.mark.slow

V1_0_0 = parse_version("1.0.0")  # the node's factory image
V1_1_0 = parse_version("1.1.0")
V1_2_0 = parse_version("1.2.0")


class Keys:
    def __init__(self, tmp: Path, name: str = "release") -> None:
        self.private = tmp / f"{name}.key"
        self.public_file = tmp / f"{name}.pub"
        self.public = generate_key(self.private, self.public_file)
        self.key = load_private_key(self.private)

    def sign(self, image: bytes, version: int, target: str = SIM_TARGET) -> SignedManifest:
        return sign_image(image, target=target, version=version, key=self.key)


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path)


def _node_cfg(tmp_path: Path, keys: Keys) -> SimNodeConfig:
    return SimNodeConfig(flash=tmp_path / "flash.bin", pubkey_file=keys.public_file, trial_timeout_s=1.5)


@contextlib.asynccontextmanager
async def _session(tmp_path: Path, keys: Keys) -> AsyncIterator[tuple[RunningSimNode, Link]]:
    async with (
        run_sim_node(_node_cfg(tmp_path, keys), "test node") as node,
        Link(node.path, timeout_s=0.3, who="test push") as link,
    ):
        yield node, link


async def _push(
    tmp_path: Path, keys: Keys, image: bytes, signed: SignedManifest, *, verify_locally: bool = True
) -> PushResult:
    async with _session(tmp_path, keys) as (_, link):
        return await push_firmware(
            link, image, signed, keys.public, health_timeout_s=10.0, verify_locally=verify_locally
        )


async def _hello_of(tmp_path: Path, keys: Keys) -> tuple[int, BootState, Health, Cap]:
    async with _session(tmp_path, keys) as (_, link):
        h = await node_hello(link)
        return h.fw_version, h.boot_state, h.health, h.caps


def test_update_is_committed_after_the_node_comes_back_healthy(tmp_path: Path, keys: Keys) -> None:
    image = make_sim_image(V1_1_0, 40_000)
    res = asyncio.run(_push(tmp_path, keys, image, keys.sign(image, V1_1_0)))
    assert (res.outcome, res.from_version, res.to_version, res.running_version) == (
        "committed",
        V1_0_0,
        V1_1_0,
        V1_1_0,
    )
    assert (res.resumed_at, res.sent_bytes) == (0, 40_000)
    assert asyncio.run(_hello_of(tmp_path, keys))[:2] == (V1_1_0, BootState.CONFIRMED)  # survives a restart
    again = asyncio.run(_push(tmp_path, keys, image, keys.sign(image, V1_1_0)))
    assert again.outcome == "up_to_date"
    assert again.sent_bytes == 0


def test_interrupted_transfers_resume_where_they_stopped(tmp_path: Path, keys: Keys) -> None:
    image = make_sim_image(V1_1_0, 60_000)
    signed = keys.sign(image, V1_1_0)

    async def gateway_gives_up() -> None:
        # The gateway side stops (a crash, a cancelled command) after about 10 kB: cancelled from
        # inside the progress callback, so it stops there however busy the machine is.
        async with _session(tmp_path, keys) as (_, link):
            push: asyncio.Task[PushResult] | None = None

            def progress(n: int, _total: int) -> None:
                if n > 10_000 and push is not None:
                    push.cancel()

            push = asyncio.create_task(
                push_firmware(link, image, signed, keys.public, progress=progress),
                name="push-to-cancel",
            )
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(push, 20)

    killed_at: list[int] = []

    async def power_cut() -> None:
        # The node loses power (SIGKILL) after about 30 kB; the push sees the link die.
        async with _session(tmp_path, keys) as (node, link):

            def progress(n: int, _total: int) -> None:
                if n > 30_000 and node.process.returncode is None:
                    killed_at.append(n)
                    node.process.kill()

            with pytest.raises(TransientError):
                await push_firmware(link, image, signed, keys.public, progress=progress)

    asyncio.run(gateway_gives_up())
    asyncio.run(power_cut())
    assert killed_at  # the power cut happened mid-transfer
    res = asyncio.run(_push(tmp_path, keys, image, signed))
    assert res.outcome == "committed"
    assert 30_000 < res.resumed_at < 60_000
    assert res.sent_bytes == 60_000 - res.resumed_at
    assert asyncio.run(_hello_of(tmp_path, keys))[0] == V1_1_0


def test_bad_signature_is_refused_by_the_gateway_and_by_the_node(tmp_path: Path, keys: Keys) -> None:
    image = make_sim_image(V1_1_0)
    forged = Keys(tmp_path, "forger").sign(image, V1_1_0)
    with pytest.raises(ImageRejectedError) as info:
        asyncio.run(_push(tmp_path, keys, image, forged))
    assert info.value.reason == "signature"
    assert "signed by a different key" in str(info.value)

    async def straight_to_the_node() -> tuple[Cap, NodeRefusedError | None]:
        async with _session(tmp_path, keys) as (_, link):
            caps = (await node_hello(link)).caps
            try:
                await link.request(MsgType.FW_BEGIN, begin_body(forged.manifest, forged.signature))
            except NodeRefusedError as exc:
                return caps, exc
            await link.request(MsgType.FW_ABORT)
            return caps, None

    caps, refused = asyncio.run(straight_to_the_node())
    if caps & Cap.ED25519:
        assert refused is not None
        assert refused.code == NackCode.BAD_SIGNATURE
    else:  # a node built without libsodium checks only the hash, by design
        assert refused is None
    assert asyncio.run(_hello_of(tmp_path, keys))[0] == V1_0_0


def test_tampered_image_is_refused_by_the_gateway_and_by_the_node(tmp_path: Path, keys: Keys) -> None:
    image = make_sim_image(V1_1_0)
    signed = keys.sign(image, V1_1_0)
    tampered = bytearray(image)
    tampered[5000] ^= 0x01
    with pytest.raises(ImageRejectedError) as info:
        asyncio.run(_push(tmp_path, keys, bytes(tampered), signed))
    assert info.value.reason == "hash"
    # Sent anyway (the gateway's check skipped), the node's own hash check refuses it.
    with pytest.raises(ImageRejectedError) as info:
        asyncio.run(_push(tmp_path, keys, bytes(tampered), signed, verify_locally=False))
    assert info.value.reason == "hash"
    assert "node computed a different sha256" in str(info.value)
    assert asyncio.run(_hello_of(tmp_path, keys))[:2] == (V1_0_0, BootState.CONFIRMED)


def test_downgrade_is_refused_by_the_gateway_and_by_the_node(tmp_path: Path, keys: Keys) -> None:
    new = make_sim_image(V1_2_0)
    assert asyncio.run(_push(tmp_path, keys, new, keys.sign(new, V1_2_0))).outcome == "committed"
    old = make_sim_image(V1_1_0)
    old_signed = keys.sign(old, V1_1_0)
    with pytest.raises(UpdateRefusedError) as info:
        asyncio.run(_push(tmp_path, keys, old, old_signed))
    assert info.value.reason == "downgrade"

    async def straight_to_the_node() -> NodeRefusedError:
        async with _session(tmp_path, keys) as (_, link):
            with pytest.raises(NodeRefusedError) as refused:
                await link.request(MsgType.FW_BEGIN, begin_body(old_signed.manifest, old_signed.signature))
            return refused.value

    refused = asyncio.run(straight_to_the_node())
    assert refused.code == NackCode.DOWNGRADE
    assert refused.detail == V1_2_0
    wrong_board = keys.sign(new, parse_version("1.3.0"), target="another-board")
    with pytest.raises(UpdateRefusedError) as info:
        asyncio.run(_push(tmp_path, keys, new, wrong_board))
    assert info.value.reason == "target"


@pytest.mark.parametrize(
    "flags", [SIM_FLAG_SELFTEST_FAIL, SIM_FLAG_SILENT], ids=["self-test-fails", "silent"]
)
def test_an_image_that_does_not_report_healthy_is_rolled_back(tmp_path: Path, keys: Keys, flags: int) -> None:
    good = make_sim_image(V1_1_0)
    assert asyncio.run(_push(tmp_path, keys, good, keys.sign(good, V1_1_0))).outcome == "committed"
    bad = make_sim_image(V1_2_0, flags=flags)
    res = asyncio.run(_push(tmp_path, keys, bad, keys.sign(bad, V1_2_0)))
    assert (res.outcome, res.to_version, res.running_version) == ("rolled_back", V1_2_0, V1_1_0)
    version, state, health, _ = asyncio.run(_hello_of(tmp_path, keys))
    assert (version, state, health) == (V1_1_0, BootState.ROLLED_BACK, Health.OK)
    # The bad image was never committed: the floor stays, so a fixed 1.2.0 can still go in.
    fixed = make_sim_image(V1_2_0, seed=1)
    assert asyncio.run(_push(tmp_path, keys, fixed, keys.sign(fixed, V1_2_0))).outcome == "committed"


def test_cli_keygen_sign_verify_push(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prefix = tmp_path / "rel"
    assert edgetwin(["firmware", "keygen", "--out", str(prefix)]) == 0
    key, pub = tmp_path / "rel.key", tmp_path / "rel.pub"
    assert os.stat(key).st_mode & 0o777 == 0o600
    assert edgetwin(["firmware", "keygen", "--out", str(prefix)]) == 78  # never overwritten
    image = tmp_path / "fw.bin"
    assert edgetwin(["sim", "node-image", str(image), "--version", "1.1.0"]) == 0
    assert (
        edgetwin(
            ["firmware", "sign", str(image), "--key", str(key), "--target", SIM_TARGET, "--version", "1.1.0"]
        )
        == 0
    )
    assert manifest_path_for(image).exists()
    assert edgetwin(["firmware", "verify", str(image), "--pubkey", str(pub)]) == 0
    image.write_bytes(image.read_bytes()[:-1] + b"\x00")
    assert edgetwin(["firmware", "verify", str(image), "--pubkey", str(pub)]) == 1
    assert "REJECTED (hash)" in capsys.readouterr().err
    os.chmod(key, 0o644)
    assert (
        edgetwin(
            ["firmware", "sign", str(image), "--key", str(key), "--target", SIM_TARGET, "--version", "1.1.0"]
        )
        == 78
    )
    assert "chmod 600" in capsys.readouterr().err
    os.chmod(key, 0o600)
    assert (
        edgetwin(
            ["firmware", "sign", str(image), "--key", str(key), "--target", SIM_TARGET, "--version", "1.1.0"]
        )
        == 0
    )

    class CliKeys(Keys):
        def __init__(self) -> None:
            self.private, self.public_file = key, pub

    async def push_and_status() -> tuple[int, int]:
        async with run_sim_node(_node_cfg(tmp_path, CliKeys()), "cli node") as node:
            # The command runs its own event loop, so it goes to a worker thread.
            pushed = await asyncio.to_thread(
                edgetwin, ["firmware", "push", str(image), "--port", str(node.path), "--pubkey", str(pub)]
            )
            status = await asyncio.to_thread(edgetwin, ["firmware", "status", "--port", str(node.path)])
            return pushed, status

    assert asyncio.run(push_and_status()) == (0, 0)
    out = capsys.readouterr().out
    assert "COMMITTED node SIM-0001: 1.0.0 -> 1.1.0" in out
    assert "firmware 1.1.0 in slot B, confirmed, health ok" in out


def test_sim_node_command_runs_the_node_on_a_linked_pty(tmp_path: Path) -> None:
    link = tmp_path / "ttyNODE"
    code = (
        "import sys, argparse\n"
        "from drivers.mcu.commands import add_commands\n"
        "p = argparse.ArgumentParser(); sub = p.add_subparsers(dest='c', required=True)\n"
        "g = {'top': sub, 'sim': sub.add_parser('sim').add_subparsers(dest='w', required=True)}\n"
        "add_commands(g); a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))\n"
    )
    argv = ["sim", "node", "--link", str(link), "--flash", str(tmp_path / "f.bin"), "--node-id", "CLI-1"]
    # stdout: its first line (the pty) is read here; stderr (its log) goes to a file.
    proc = LoggedProcess(
        [sys.executable, "-c", code, *argv], log=tmp_path / "node.log", stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("PTY /dev/pts/")
        assert link.resolve() == Path(line.split()[1])

        async def hello() -> str:
            async with Link(link, timeout_s=0.5) as lk:
                return (await node_hello(lk)).node_id

        assert asyncio.run(hello()) == "CLI-1"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode == 0  # the node itself got SIGTERM: the command became the node
    assert "stats sent=" in err
    assert not link.exists()


def test_a_push_to_a_node_a_running_driver_reads_borrows_the_port_and_gives_it_back(
    tmp_path: Path, keys: Keys
) -> None:
    image = tmp_path / "fw.bin"
    assert edgetwin(["sim", "node-image", str(image), "--version", "1.1.0"]) == 0
    signing = ("--key", str(keys.private), "--target", SIM_TARGET, "--version", "1.1.0")
    assert edgetwin(["firmware", "sign", str(image), *signing]) == 0
    push = [
        sys.executable,
        "-m",
        "gateway.cli",
        "firmware",
        "push",
        str(image),
        "--pubkey",
        str(keys.public_file),
    ]

    async def main() -> tuple[str, float, float, McuDriver, RecordingSink]:
        sink = RecordingSink(samples=False)
        async with run_sim_node(_node_cfg(tmp_path, keys), "test node") as node:
            driver = factory(
                SourceInfo("motor7-adc", "plant-A/motor-7", "industrial"), McuConfig(port=node.path)
            )
            async with running_driver(driver, sink):
                t0 = time.monotonic()
                # A separate program, as on site: it finds the port taken and borrows it.
                proc = await asyncio.create_subprocess_exec(
                    *push, "--port", str(node.path), stdout=subprocess.PIPE, stderr=subprocess.PIPE
                )
                out, err = await asyncio.wait_for(proc.communicate(), 60)
                t_done = time.monotonic()
                assert proc.returncode == 0, err.decode()
                while not any(at > t_done for at, _ in sink.blocks):
                    assert time.monotonic() - t_done < 5, "no data after the push"
                    await asyncio.sleep(0.01)
                back = next(at for at, _ in sink.blocks if at > t_done) - t_done
                return out.decode(), back, t_done - t0, driver, sink

    out, back, push_s, driver, sink = asyncio.run(main())
    print(f"\nfirmware push through a running driver: {push_s:.2f} s; data back {back:.2f} s after it ended")
    assert "paused for the push" in out
    assert "COMMITTED node SIM-0001: 1.0.0 -> 1.1.0" in out
    assert back < 2.0
    assert driver.hello is not None
    assert driver.hello.fw_version == V1_1_0  # connected again to the new image
    (lent,) = [d.detail for d in sink.diagnostics if d.kind == "mcu_handover"]
    assert 0 < float(lent["held_s"]) <= push_s
    assert float(lent["held_s"]) <= float(lent["gap_s"]) <= push_s + back
    assert driver.counters["handovers"] == 1
