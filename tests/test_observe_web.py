"""The status page and ``/metrics`` of a running gateway (``edgetwin run`` as a subprocess).

The page is driven in Debian's chromium by playwright-core (tests/browser/); the metrics are
scraped over HTTP and parsed with the Prometheus client's own parser.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from peers import ONE_AT_A_TIME, LoggedProcess, free_port
from prometheus_client.parser import text_string_to_metric_families

from drivers.serial.sim import PtyOximeter, VitalsModel
from gateway.cli import main
from gateway.uplink.certs import DemoCA

pytestmark = [pytest.mark.slow, ONE_AT_A_TIME]

ROOT = Path(__file__).resolve().parent.parent
BROWSER = ROOT / "tests" / "browser"
DOCS = ROOT / "docs"
PATIENT = "MRN-5521-MILLER"
TOKEN = "3f6c1d0e9a8b7c6d5e4f3a2b1c0d9e8f"


def _sim(name: str = "bed4-sim") -> str:
    return f"""
[[sources]]
name = "{name}"
driver = "sim"
subject = "{PATIENT}"
profile = "patient"
device = "A4:C1:38:00:00:04"
"""


def _config(tmp: Path, status: str, body: str) -> Path:
    path = tmp / "edgetwin.toml"
    path.write_text(
        f'[gateway]\nname = "ward4-hub"\nstate_dir = "{tmp / "state"}"\n'
        "[pipeline]\nwindow_s = 2.0\nhop_s = 1.0\ngrace_s = 0.3\nsensor_lost_s = 2.0\n"
        "[runtime]\ndrain_deadline_s = 3.0\n"
        f'[uplink]\nkind = "local"\npath = "{tmp / "out.jsonl"}"\n'
        f"[status]\n{status}\n" + body
    )
    return path


@pytest.fixture
def run_gateway(tmp_path: Path) -> Iterator[Any]:
    procs: list[LoggedProcess] = []

    def start(config: Path, prefix: Sequence[str] = ()) -> LoggedProcess:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        env.pop("NOTIFY_SOCKET", None)
        proc = LoggedProcess(
            [*prefix, sys.executable, "-m", "gateway.cli", "run", "--config", str(config)],
            log=tmp_path / "gateway.log",
            env=env,
            stdout=subprocess.DEVNULL,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()


def _get(url: str, ctx: ssl.SSLContext | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=ctx) as r:
            return int(r.status), bytes(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _wait_http(url: str, proc: LoggedProcess, ctx: ssl.SSLContext | None = None) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.err()
        try:
            _get(url, ctx, timeout=1.0)
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{url} never answered")


@contextlib.contextmanager
def _lan() -> Iterator[tuple[list[str], str]]:
    """A private network namespace with a non-loopback address; (command prefix, address).

    Where no namespace can be made (no root, no iproute2), loopback stands in: the token is then
    still required (it is configured), only the address is not a LAN one.
    """
    name = f"edgetwin-web-{os.getpid()}"
    ip = shutil.which("ip")
    if ip is None or subprocess.run([ip, "netns", "add", name], capture_output=True, check=False).returncode:
        yield [], "127.0.0.1"
        return
    try:
        # No IPv6 in the namespace: its link-local addresses finish duplicate detection a second or
        # two after the links come up, and chromium aborts a navigation in flight on that change
        # (net::ERR_NETWORK_CHANGED).
        for conf in ("all", "default"):
            knob = f"/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"
            subprocess.run(
                [ip, "netns", "exec", name, "sh", "-c", f"echo 1 > {knob}"], check=False, capture_output=True
            )
        for cmd in (
            ["link", "add", "etw0", "type", "veth", "peer", "name", "etw1"],
            ["addr", "add", "10.231.0.1/24", "dev", "etw0"],
            ["link", "set", "etw0", "up"],
            ["link", "set", "etw1", "up"],
            ["link", "set", "lo", "up"],
        ):
            subprocess.run([ip, "netns", "exec", name, ip, *cmd], check=True, capture_output=True)
        yield [ip, "netns", "exec", name], "10.231.0.1"
    finally:
        subprocess.run([ip, "netns", "del", name], check=False, capture_output=True)


_FETCH = """
import ssl, sys, urllib.error, urllib.request
ctx = ssl.create_default_context(cafile=sys.argv[2])
try:
    with urllib.request.urlopen(sys.argv[1], timeout=3, context=ctx) as r:
        print(r.status)
except urllib.error.HTTPError as exc:
    print(exc.code)
except OSError:
    print(0)
"""


def _fetch(prefix: Sequence[str], url: str, cafile: Path) -> int:
    """The HTTP status of ``url`` fetched from inside the namespace (0: no connection)."""
    done = subprocess.run(
        [*prefix, sys.executable, "-c", _FETCH, url, str(cafile)],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    return int(done.stdout.strip() or 0)


def _samples(families: list[Any]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def test_metrics_follow_the_running_state(tmp_path: Path, run_gateway: Any) -> None:
    port = free_port()
    config = _config(tmp_path, f'http = "127.0.0.1:{port}"', _sim())
    proc = run_gateway(config)
    base = f"http://127.0.0.1:{port}"
    _wait_http(base + "/api/status", proc)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # until windows have closed and records flowed
        before = json.loads(_get(base + "/api/status")[1])
        if before["pipeline"].get("windower_windows", 0) >= 2 and before["uplink"]["delivered"] > 0:
            break
        time.sleep(0.3)
    status, body = _get(base + "/metrics")
    after = json.loads(_get(base + "/api/status")[1])
    assert status == 200
    families = list(text_string_to_metric_families(body.decode()))
    names = {f.name for f in families}
    assert {
        "edgetwin_health",
        "edgetwin_unit_up",
        "edgetwin_source_up",
        "edgetwin_samples",
        "edgetwin_stream_last_sample_age_seconds",
        "edgetwin_stream_dropped",
        "edgetwin_windows",
        "edgetwin_records",
        "edgetwin_outbox_records",
        "edgetwin_outbox_bytes",
        "edgetwin_outbox_oldest_age_seconds",
        "edgetwin_outbox_dropped",
        "edgetwin_outbox_budget_bytes",
        "edgetwin_outbox_degraded",
        "edgetwin_uplink_connected",
        "edgetwin_uplink_delivered",
        "edgetwin_model_demoted",
        "edgetwin_alarms_active",
        "process_resident_memory_bytes",
        "process_cpu_seconds",
    } <= names
    types = {f.name: f.type for f in families}
    assert types["edgetwin_samples"] == "counter"
    assert types["edgetwin_outbox_records"] == "gauge"
    got = _samples(families)
    assert got[("edgetwin_health", ())] == 0.0
    assert got[("edgetwin_outbox_degraded", ())] == 0.0
    assert got[("edgetwin_metric_names_holding_identity", ())] == 0.0
    units = {dict(k[1])["unit"]: v for k, v in got.items() if k[0] == "edgetwin_unit_up"}
    assert units == {u["name"]: 1.0 for u in after["units"]}
    assert {"outbox", "uplink", "pipeline", "source:bed4-sim", "status", "web"} == set(units)
    assert got[("edgetwin_source_up", (("driver", "sim"), ("source", "bed4-sim")))] == 1.0
    assert got[("edgetwin_outbox_budget_bytes", ())] == after["outbox"]["budget_bytes"] == 256 * 2**20
    for st in after["sources"][0]["streams"]:
        key = ("edgetwin_samples_total", (("metric", st["metric"]), ("source", "bed4-sim")))
        earlier = next(x["samples"] for x in before["sources"][0]["streams"] if x["metric"] == st["metric"])
        assert earlier <= got[key] <= st["samples"]  # the scrape lies between the two snapshots
    windows = got[("edgetwin_windows_total", ())]
    assert before["pipeline"]["windower_windows"] <= windows <= after["pipeline"]["windower_windows"]
    assert windows >= 2
    assert before["uplink"]["delivered"] <= got[("edgetwin_uplink_delivered_total", (("kind", "local"),))]
    assert got[("edgetwin_uplink_connected", (("kind", "local"),))] == 1.0
    assert got[("process_resident_memory_bytes", ())] > 20e6
    assert PATIENT not in body.decode()  # no identity in labels
    assert not any("subject" in dict(k[1]) for k in got)


def test_lan_binding_needs_tls_and_a_token(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, 'http = "192.0.2.10:9180"', _sim())
    assert main(["check", "--config", str(config), "--quiet"]) == 78
    out = capsys.readouterr().out
    assert (
        "fail  config: status: expected a valid value, found a table (http on 192.0.2.10 reaches beyond this "
        "machine: set tls_cert_file and tls_key_file)"
    ) in out


def _require_browser() -> str:
    node = shutil.which("node")
    chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    if (
        node is None
        or not Path(chromium).exists()
        or not (BROWSER / "node_modules" / "playwright-core").is_dir()
    ):
        pytest.fail("node, chromium or playwright-core missing: run 'bash .ci/setup test'")
    return node


def test_status_page_in_chromium(tmp_path: Path, run_gateway: Any) -> None:
    node = _require_browser()
    with _lan() as (prefix, host):
        steps = _browse(tmp_path, run_gateway, node, prefix, host)
    # Served on a LAN address in a private network namespace (loopback only where none can be made).
    assert host == "10.231.0.1" or not prefix
    print(f"status page served on {host} ({'a private network namespace' if prefix else 'loopback'})")
    _check_steps(steps, tmp_path / "shots")


def _browse(
    tmp_path: Path, run_gateway: Any, node: str, prefix: list[str], host: str
) -> dict[str, dict[str, Any]]:
    ca = DemoCA(tmp_path / "pki", "edgetwin status CA")
    web = ca.issue("web", "edgetwin status page", server=True, hosts=(host,))
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    oxi = PtyOximeter(
        "nonin2", link=tmp_path / "usb-oximeter", vitals=VitalsModel(5, desat_every_s=0, sensor_off_every_s=0)
    ).start()
    port = free_port()
    config = _config(
        tmp_path,
        f'http = "{host}:{port}"\ntls_cert_file = "{web.cert}"\ntls_key_file = "{web.key}"\n'
        f'token_file = "{token}"',
        _sim()
        + f'[[sources]]\nname = "bed4-spo2"\ndriver = "serial"\nsubject = "{PATIENT}"\nport = "{oxi.path}"\n'
        'protocol = "nonin2"\n',
    )
    proc = run_gateway(config, prefix)
    url = f"https://{host}:{port}/"
    steps: dict[str, dict[str, Any]] = {}
    try:
        deadline = time.monotonic() + 60
        while _fetch(prefix, url + "metrics", ca.ca_file) == 0:
            assert proc.poll() is None, proc.err()
            assert time.monotonic() < deadline, f"{url} never answered"
            time.sleep(0.3)
        assert _fetch(prefix, url + "metrics", ca.ca_file) == 401  # the token guards every route
        assert _fetch(prefix, url + "api/status?token=" + TOKEN, ca.ca_file) == 200
        shots = tmp_path / "shots"
        shots.mkdir()
        with LoggedProcess(
            [*prefix, node, str(BROWSER / "statuspage.mjs"), f"{url}?token={TOKEN}", str(shots)],
            log=tmp_path / "statuspage.log",
            cwd=BROWSER,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,  # read line by line below, as the page steps along
        ) as driver:
            assert driver.stdout is not None
            assert driver.stdin is not None
            try:
                for line in driver.stdout:
                    step = json.loads(line)
                    steps[step["step"]] = step
                    if step["step"] == "live":
                        oxi.unplug()  # the alarm the page must show
                        driver.stdin.write("alarm\n")
                        driver.stdin.flush()
                    if step["step"] == "alarm":
                        break
                driver.stdin.close()
                driver.wait(timeout=60)
                err = driver.err()
            finally:
                if driver.poll() is None:
                    driver.kill()
        assert "alarm" in steps, err
    finally:
        oxi.stop()
        proc.stop()
    return steps


def _check_steps(steps: dict[str, dict[str, Any]], shots: Path) -> None:
    refused = steps["without-token"]
    assert refused["status"] == 401
    assert refused["text"].startswith("edgetwin status: a token is required")
    live = steps["live"]
    assert live["status"] == 200
    assert live["badge"] in {"healthy", "degraded"}
    before, after = dict(live["first"]), dict(live["second"])
    assert any(before[k] != after[k] for k in before if k in after)  # live values changed
    assert max(live["points"]) >= 2  # trend lines drawn
    assert PATIENT not in live["html"]  # pseudonyms only
    assert "bed4-spo2" in live["html"]
    alarm = steps["alarm"]
    assert any(row[:3] == ["device_lost", "medium", "bed4-spo2"] for row in alarm["alarms"]), alarm
    assert alarm["badge"] == "degraded"
    for name in ("status-page.png", "status-page-alarm.png"):
        assert (shots / name).stat().st_size > 10_000
        if os.environ.get("EDGETWIN_UPDATE_SCREENSHOTS"):
            shutil.copyfile(shots / name, DOCS / name)
