"""Config validation: every problem at once, with key path, expectation and what was found."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from drivers import REGISTRY
from gateway.config import load
from gateway.errors import InvalidConfigError
from gateway.uplink.certs import demo_pki

EXAMPLES = Path(__file__).resolve().parent.parent / "gateway" / "examples"

SIM = """
[[sources]]
name = "bed1"
driver = "sim"
subject = "bed-1"
profile = "patient"
device = "A4:C1:38:00:00:01"
"""

CORE_KEYS = "alarms, downlink, estimators, gateway, logging, models, outbox, pipeline, privacy, runtime, sources, status, uplink"

# (name, config text, [exact problem lines without the "<file>: " prefix])
BAD_CONFIGS: list[tuple[str, str, list[str]]] = [
    (
        "typo in a section name",
        "[gatway]\nname = 'x'\n",
        [f"gatway: expected one of the known keys ({CORE_KEYS}), found unknown key 'gatway'"],
    ),
    (
        "typo in a key",
        "[pipeline]\nwindw_s = 30.0\n",
        [
            "pipeline.windw_s: expected one of the known keys "
            "(grace_s, hop_s, sensor_lost_s, sensor_restore_s, window_s), found unknown key 'windw_s'"
        ],
    ),
    (
        "negative window",
        "[pipeline]\nwindow_s = -1.0\n",
        ["pipeline.window_s: expected a number > 0, found -1.0"],
    ),
    (
        "number given as a string",
        "[pipeline]\nwindow_s = 'thirty'\n",
        ["pipeline.window_s: expected a number, found 'thirty'"],
    ),
    (
        "hop longer than the window",
        "[pipeline]\nwindow_s = 10.0\nhop_s = 20.0\n",
        [
            "pipeline.hop_s: expected at most window_s (10), or samples between windows are never used, found 20.0"
        ],
    ),
    (
        "not a finite number",
        "[pipeline]\ngrace_s = nan\n",
        ["pipeline.grace_s: expected a finite number, found nan"],
    ),
    (
        "unknown choice",
        "[privacy]\ntime = 'fuzzy'\n",
        ["privacy.time: expected one of 'relative', 'coarse' or 'exact', found 'fuzzy'"],
    ),
    (
        "inline secret",
        "[uplink]\npassword = 'hunter2'\n",
        [
            'uplink.password: expected a file reference (password_file = "/etc/edgetwin/secrets/...", '
            "mode 0600); secrets are never written inline, found an inline secret"
        ],
    ),
    (
        "boolean as a word",
        SIM + "enabled = 'yes'\n",
        ["sources[0].enabled: expected true or false, found 'yes'"],
    ),
    (
        "unknown driver",
        "[[sources]]\nname = 'ox'\ndriver = 'oximeter'\nsubject = 'bed-1'\n",
        ["sources[0].driver: expected one of the drivers (ble, mcu, opcua, serial, sim), found 'oximeter'"],
    ),
    (
        "missing subject",
        "[[sources]]\nname = 'ox'\ndriver = 'sim'\nprofile = 'patient'\ndevice = 'd1'\n",
        ["sources[0].subject: expected this required key, found nothing"],
    ),
    (
        "unknown key in a driver's table",
        SIM + "port = '/dev/ttyUSB0'\n",
        [
            "sources[0].port: expected one of the known keys "
            "(device, events, hang, profile, random_events_per_hour, rate_hz, seed, stall_loop), found unknown key 'port'"
        ],
    ),
    (
        "driver value out of range",
        SIM + "rate_hz = 0.0\n",
        ["sources[0].rate_hz: expected a number > 0, found 0.0"],
    ),
    (
        "two sources with one name",
        SIM + SIM.replace("bed-1", "bed-2"),
        ["sources[1].name: expected a name not used by another source (sources[0] has it), found 'bed1'"],
    ),
    (
        "sources not an array of tables",
        "sources = 'bed1'\n",
        ["sources: expected an array of tables ([[sources]]), found 'bed1'"],
    ),
    (
        "bad source name characters",
        SIM.replace('name = "bed1"', 'name = "bed 1/a"'),
        ["sources[0].name: expected letters, digits, '_', '.' or '-' only, found 'bed 1/a'"],
    ),
    (
        "TOML syntax error",
        "[pipeline]\nwindow_s 30\n",
        [
            "(syntax): expected valid TOML, found Expected '=' after a key in a key/value pair "
            "(at line 2, column 10)"
        ],
    ),
    (
        "unknown RUL backend",
        "[[estimators.rul]]\nsubject = 'm'\ncycle_s = 10.0\nprefix = 'E/'\nbackend = 'tpu'\n",
        [
            "estimators.rul[0].backend: expected one of 'card', 'onnxruntime', 'litert', 'tflite' or "
            "'numpy', found 'tpu'"
        ],
    ),
    (
        "several problems at once",
        "[pipeline]\nwindow_s = 0.0\n[logging]\nlevel = 'loud'\n" + SIM + "seed = 'x'\n",
        [
            "pipeline.window_s: expected a number > 0, found 0.0",
            "logging.level: expected one of 'debug', 'info', 'warning' or 'error', found 'loud'",
            "sources[0].seed: expected an integer, found 'x'",
        ],
    ),
]


@pytest.mark.parametrize(
    ("text", "expected"), [(t, e) for _, t, e in BAD_CONFIGS], ids=[n for n, _, _ in BAD_CONFIGS]
)
def test_bad_config_reports_exact_problems(tmp_path: Path, text: str, expected: list[str]) -> None:
    path = tmp_path / "edgetwin.toml"
    path.write_text(text)
    with pytest.raises(InvalidConfigError) as info:
        load(path, REGISTRY)
    assert [str(p) for p in info.value.problems] == [f"{path}: {line}" for line in expected]


def test_at_least_fifteen_bad_configs() -> None:
    assert len(BAD_CONFIGS) >= 15


def test_secret_file_readable_by_others_is_refused_with_the_fix(tmp_path: Path) -> None:
    key = tmp_path / "site.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o644)
    path = tmp_path / "edgetwin.toml"
    path.write_text(f"[privacy]\nsite_key_file = '{key}'\n")
    with pytest.raises(InvalidConfigError) as info:
        load(path, REGISTRY)
    assert [str(p) for p in info.value.problems] == [
        f"{path}: privacy.site_key_file: expected a file only its owner can read (run 'chmod 600 {key}'), "
        "found mode 0644"
    ]
    key.chmod(0o600)
    assert load(path, REGISTRY).core.site_key_path == key


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidConfigError, match="expected an existing file, found no such file"):
        load(tmp_path / "nope.toml", REGISTRY)


def test_defaults_and_paths(tmp_path: Path) -> None:
    path = tmp_path / "edgetwin.toml"
    path.write_text(f"[gateway]\nstate_dir = '{tmp_path}'\n" + SIM)
    config = load(path, REGISTRY)
    assert config.core.outbox_path == tmp_path / "outbox.db"
    assert config.core.site_key_path == tmp_path / "site.key"
    assert config.core.pipeline.window_s == 30.0
    assert config.core.pipeline.sensor_restore_s == 2.0
    (entry,) = config.sources
    assert (entry.info.name, entry.info.subject, entry.info.kind, entry.driver) == (
        "bed1",
        "bed-1",
        "medical",
        "sim",
    )


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.name)
def test_examples_pass_check(example: Path, tmp_path: Path) -> None:
    # The examples name the files a real install has; here a demo PKI and a scratch state dir
    # stand in for them, and nothing else of the example changes.
    pki = demo_pki(tmp_path / "pki")
    text = example.read_text()
    for real, here in (
        ("/etc/edgetwin/tls/ca.crt", pki.ca_file),
        ("/etc/edgetwin/tls/gateway.crt", pki.gateway.cert),
        ("/etc/edgetwin/secrets/gateway.key", pki.gateway.key),
        ("/var/lib/edgetwin", tmp_path / "state"),
    ):
        assert real in text
        text = text.replace(real, str(here))
    config = tmp_path / example.name
    config.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout
    lines = result.stdout.splitlines()
    assert lines[-1].startswith(f"config {config}: ok (")
    assert "warning" not in lines[-1]
    assert all(line.startswith(("pass  ", "config ")) for line in lines), result.stdout
    assert result.stderr == ""  # not even a model's note about its window length
    assert "(sim," not in lines[-1]  # real drivers
    assert 'kind = "mqtt"' in text


def test_check_exit_code_and_output_on_bad_config(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[pipeline]\nwindow_s = -1.0\n[outbox]\nmax_mb = 'lots'\n")
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 78
    assert "fail  config: pipeline.window_s: expected a number > 0, found -1.0" in result.stdout
    assert "fail  config: outbox.max_mb: expected a number, found 'lots'" in result.stdout
    assert f"config {path}: 2 failure(s), 0 warning(s)" in result.stdout


def test_sensor_restore_hold_is_read_and_bounded(tmp_path: Path) -> None:
    path = tmp_path / "edgetwin.toml"
    path.write_text("[pipeline]\nsensor_restore_s = 0\n")
    assert load(path, REGISTRY).core.pipeline.sensor_restore_s == 0.0
    path.write_text("[pipeline]\nsensor_restore_s = 61.0\n")
    with pytest.raises(InvalidConfigError) as info:
        load(path, REGISTRY)
    assert any("pipeline.sensor_restore_s" in str(p) for p in info.value.problems)


def test_models_section_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "edgetwin.toml"
    path.write_text(
        "[models]\nuse = [{ name = 'pump_skab', subjects = ['line2/pump-1'], commissioning_s = 60.0 }]\n"
    )
    (use,) = load(path, REGISTRY).core.models.use
    assert (use.name, list(use.subjects), use.commissioning_s) == ("pump_skab", ["line2/pump-1"], 60.0)


def test_check_builds_drivers_and_models(tmp_path: Path) -> None:
    path = tmp_path / "edgetwin.toml"
    # Valid keys, but the sim refuses a pump profile on a medical source, and no such model ships.
    path.write_text(
        SIM.replace('profile = "patient"', 'profile = "pump"') + "[models]\nuse = [{ name = 'nope' }]\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 78
    assert "fail  build: sources[0] (bed1):" in result.stdout
    assert "fail  build: models: models nope" in result.stdout
