"""Commands a newcomer meets: --help with defaults, version --verbose, rotate-key's warning, demo-ca's broker."""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from peers import LoggedProcess, free_port
from uplink_support import require_mosquitto

from gateway.anonymize import Pseudonymizer
from gateway.cli import build_parser, main

CORE_COMMANDS = ("run", "check", "demo", "version", "rotate-key", "status", "support-bundle")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


@pytest.mark.parametrize("command", CORE_COMMANDS)
def test_every_option_has_help_showing_its_default(command: str) -> None:
    sub = _subparsers(build_parser())[command]
    text = sub.format_help()
    for action in sub._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{command} {action.option_strings[0]} has no help"
        if not action.required:
            assert f"(default: {action.default})" in " ".join(text.split()), action.option_strings[0]


def _all_parsers(
    parser: argparse.ArgumentParser, path: str = "edgetwin"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for name, sub in _subparsers(parser).items():
        yield from _all_parsers(sub, f"{path} {name}")


def test_every_option_of_every_command_has_help() -> None:
    missing = [
        f"{path} {action.option_strings[0]}"
        for path, parser in _all_parsers(build_parser())
        for action in parser._actions
        if action.option_strings and not isinstance(action, argparse._HelpAction) and not action.help
    ]
    assert missing == []


def test_plugin_commands_show_defaults_too() -> None:
    text = " ".join(_subparsers(_subparsers(build_parser())["provision"])["demo-ca"].format_help().split())
    assert "(default: 8883)" in text
    assert "(default: gateway)" in text


def test_version_verbose(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version", "--verbose"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "edgetwin 0.1.0"
    assert lines[1].startswith("python 3.")
    assert lines[2].startswith("os ")
    assert lines[3].startswith("kernel Linux ")
    assert "  numpy==" in out
    assert "  pydantic==" in out
    assert main(["version"]) == 0
    assert capsys.readouterr().out == "edgetwin 0.1.0\n"


def test_rotate_key_says_what_changes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "edgetwin.toml"
    config.write_text(f'[gateway]\nname = "hub-3"\nstate_dir = "{tmp_path}"\n')
    key = tmp_path / "site.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    before = Pseudonymizer(key.read_bytes())("gateway", "hub-3")
    assert main(["rotate-key", "--config", str(config)]) == 0
    after = Pseudonymizer(key.read_bytes())("gateway", "hub-3")
    out = capsys.readouterr().out
    assert before != after
    assert f"the gateway's pseudonym ({before} -> {after}), which is its MQTT client id" in out
    assert "the name its certificate must carry: run 'edgetwin provision key'" in out


@pytest.fixture
def open_dir() -> Iterator[Path]:
    # The broker drops to its own user: its files must be reachable outside root's private /tmp dirs.
    path = Path(tempfile.mkdtemp(prefix=f"edgetwin-democa-{os.getpid()}-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path)


def test_demo_ca_writes_a_mosquitto_config_that_runs(
    open_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    require_mosquitto()
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    pki = open_dir / "pki"
    assert (
        main(["provision", "demo-ca", "--out-dir", str(pki), "--port", str(port), "--listen", "127.0.0.1"])
        == 0
    )
    out = capsys.readouterr().out
    conf = pki / "mosquitto.conf"
    assert f"mosquitto configuration {conf}: start the broker with 'mosquitto -c {conf}'" in out
    assert f"listener {port} 127.0.0.1\n" in conf.read_text()
    key = pki / "broker.key"
    assert (key.stat().st_mode & 0o777) == 0o600
    if os.geteuid() == 0 and "owned by mosquitto" in out:
        assert key.stat().st_uid == pwd.getpwnam("mosquitto").pw_uid
    # Its log goes to a file: a pipe read only when it ends would fill with a connection per attempt.
    broker = LoggedProcess([exe, "-c", str(conf)], log=open_dir / "mosquitto.log")
    try:
        config = open_dir / "edgetwin.toml"
        config.write_text(
            f'[gateway]\nstate_dir = "{open_dir / "state"}"\n[uplink]\nkind = "mqtt"\n[uplink.mqtt]\n'
            f'host = "127.0.0.1"\nport = {port}\nca_file = "{pki / "edgetwin-demo-ca.crt"}"\n'
            f'cert_file = "{pki / "gateway.crt"}"\nkey_file = "{pki / "gateway.key"}"\nconnect_timeout_s = 3.0\n'
        )
        deadline = time.monotonic() + 15
        while True:
            assert broker.poll() is None, broker.out() + broker.err()
            main(["check", "--config", str(config), "--online"])
            text = capsys.readouterr().out
            if f"pass  mqtt: CONNACK from 127.0.0.1:{port} (MQTT 5), accepted" in text:
                break
            assert time.monotonic() < deadline, text
            time.sleep(0.3)
    finally:
        broker.terminate()
        broker.communicate(timeout=10)
