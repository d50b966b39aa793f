"""What a running gateway imports: a one-source service without models loads no model code.

Each test runs the ``edgetwin run`` command as the service runs (its ``main`` in a subprocess, with
the MQTT uplink to a local mosquitto with TLS), stops it with SIGTERM once it is ready, and reads
the names in ``sys.modules`` that an exit hook wrote as the process ended: every module it
imported, at start-up or later, by an import statement or by ``importlib`` (which
``-X importtime`` does not show).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
from uplink_support import mosquitto_pki, running_broker

from drivers.opcua import lean
from drivers.opcua.plcsim import PlcSimProcess
from gateway.uplink.broker import MosquittoBroker, free_port
from gateway.uplink.certs import DemoPKI

ROOT = Path(__file__).resolve().parent.parent

# Model code (the runner, its backends and runtimes, cards, shadow slots), the estimators, the
# config models of drivers the config does not use, and what serves features it leaves off.
NOT_FOR_ONE_SOURCE = (
    "onnxruntime",
    "ai_edge_litert",
    "tflite_runtime",
    "gateway.inference.runner",
    "gateway.inference.backends",
    "gateway.inference.card",
    "gateway.inference.shadow",
    "gateway.estimation.fusion",
    "gateway.estimation.battery",
    "gateway.estimation.rul",
    "drivers.opcua",
    "drivers.ble",
    "drivers.mcu",
    "drivers.serial",
    "asyncua",
    "bleak",
    "serial",
    # Off in this config: the status page, Sparkplug B, units-aware rules; certificate expiry is
    # read with the ssl module's decoder.
    "aiohttp",
    "gateway.observe.web",
    "gateway.uplink.sparkplug.node",
    "google.protobuf",
    "pint",
    "cryptography",
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DemoPKI:
    return mosquitto_pki(tmp_path_factory)


@pytest.fixture
def broker(tmp_path: Path, pki: DemoPKI) -> Iterator[MosquittoBroker]:
    yield from running_broker(tmp_path, pki)


def _config(tmp: Path, pki: DemoPKI, broker: MosquittoBroker, models: str, sources: str = "") -> Path:
    path = tmp / "edgetwin.toml"
    path.write_text(
        f"""
[gateway]
name = "bed-hub"
state_dir = "{tmp / "state"}"

[uplink]
kind = "mqtt"

[uplink.mqtt]
host = "{broker.host}"
port = {broker.port}
ca_file = "{pki.ca_file}"
cert_file = "{pki.gateway.cert}"
key_file = "{pki.gateway.key}"

[models]
use = [{models}]

[runtime]
drain_deadline_s = 5.0

[[sources]]
name = "bed1"
driver = "sim"
subject = "bed-1"
kind = "medical"
profile = "patient"
device = "A4:C1:38:5B:20:7E"
{sources}"""
    )
    return path


# The command's entry point with one hook: at exit, the names of every module the process holds.
RUN = """
import atexit, json, sys
out = sys.argv.pop(1)
atexit.register(lambda: open(out, "w").write(json.dumps(sorted(sys.modules))))
from gateway.cli import main
sys.exit(main(sys.argv[1:]))
"""


def imported_by_a_run(config: Path) -> set[str]:
    """Every module ``edgetwin run`` imported from its start until it was ready and stopped."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("NOTIFY_SOCKET", None)
    modules = config.with_name("modules.json")
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN, str(modules), "run", "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "gateway ready" in line:
                ready.set()

    reader = threading.Thread(target=read, name="test:gateway-stderr", daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 90.0
        while not ready.wait(0.1) and proc.poll() is None and time.monotonic() < deadline:
            pass
        assert ready.is_set(), "edgetwin run never got ready:\n" + "".join(lines[-30:])
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait(timeout=5)
        reader.join(timeout=5)
        if proc.stderr is not None:
            proc.stderr.close()
    assert code == 0, "".join(lines[-30:])
    return set(json.loads(modules.read_text()))


def _loaded(modules: set[str], prefix: str) -> list[str]:
    return sorted(m for m in modules if m == prefix or m.startswith(prefix + "."))


def test_one_source_without_models_loads_no_model_code(
    tmp_path: Path, pki: DemoPKI, broker: MosquittoBroker
) -> None:
    modules = imported_by_a_run(_config(tmp_path, pki, broker, ""))
    # What the service does use was seen: the list is the run's, not an empty one.
    for needed in ("drivers.sim.driver", "gateway.uplink.mqtt", "gateway.inference.plausibility"):
        assert needed in modules, needed
    loaded = {p: _loaded(modules, p) for p in NOT_FOR_ONE_SOURCE}
    assert not any(loaded.values()), {p: m for p, m in loaded.items() if m}


def test_with_a_model_the_runner_and_its_runtime_load(
    tmp_path: Path, pki: DemoPKI, broker: MosquittoBroker
) -> None:
    modules = imported_by_a_run(_config(tmp_path, pki, broker, '{ name = "vitals_mimic" }'))
    assert "gateway.inference.runner" in modules
    assert "gateway.inference.shadow" in modules
    # The runtime the card chose serves (numpy: no runtime library at all), no other is loaded.
    chosen = json.loads((ROOT / "models" / "vitals_mimic.card.json").read_text())["backend"]
    runtimes = {"onnxruntime": "onnxruntime", "litert": "ai_edge_litert"}
    for backend, module in runtimes.items():
        assert bool(_loaded(modules, module)) == (backend == chosen), (backend, chosen)
    assert not _loaded(modules, "drivers.opcua")


def test_an_opcua_client_loads_neither_the_server_nor_its_address_space(
    tmp_path: Path, pki: DemoPKI, broker: MosquittoBroker
) -> None:
    plc = PlcSimProcess(free_port(), "--rate-hz", "5")
    plc.start()
    try:
        opcua = f"""
[[sources]]
name = "pump-plc"
driver = "opcua"
subject = "plant-A/pump-3"
kind = "industrial"
endpoint = "{plc.endpoint}"
security_policy = "None"
security_mode = "None"
namespace_uri = "urn:edgetwin:plcsim"
nodes = [{{ browse_path = "Pump1/Motor/Current" }}]
"""
        modules = imported_by_a_run(_config(tmp_path, pki, broker, "", opcua))
    finally:
        plc.stop()
    # The client and its session ran (ready waits for the source's subscription) ...
    for needed in ("drivers.opcua.driver", "asyncua.client.client", "asyncua.common.subscription"):
        assert needed in modules, needed
    # ... and asyncua's server side never loaded (its package __init__ imports it for everyone),
    # nor, without a security policy, cryptography (~8 MB) or what only asyncua's certificate,
    # XML and date-parsing functions use.
    unused = (
        "asyncua.server",
        "cryptography",
        "drivers.opcua.pki",
        "dateutil",
        "pytz",
        "asyncua.crypto.cert_gen",
        "asyncua.common.xmlimporter",
    )
    loaded = {p: _loaded(modules, p) for p in unused}
    assert not any(loaded.values()), {p: m for p, m in loaded.items() if m}


# A fresh interpreter: asyncua through the driver package, then its server asked for by name.
LEAN = """
import sys
import drivers.opcua
import asyncua
from drivers.opcua import lean
before = "asyncua.server" in sys.modules
from asyncua import Server
from asyncua.server.server import Server as Direct
print(lean.served(), before, Server is Direct is asyncua.Server, asyncua.__version__, asyncua.Client.__name__)
try:
    asyncua.NoSuchName
except AttributeError as exc:
    print(exc)
"""


def test_asyncua_keeps_its_names_and_loads_its_server_on_first_use() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", LEAN], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    first, second = out.stdout.splitlines()
    served, before, same, version, client = first.split()
    assert (served, before, same, client) == ("True", "False", "True", "Client")
    assert version == metadata.version("asyncua")
    assert second == "module 'asyncua' has no attribute 'NoSuchName'"


def test_the_sparkplug_codec_reads_status_codes_without_asyncuas_server() -> None:
    code = (
        "import sys; from gateway.uplink.sparkplug.codec import opcua_status_code; "
        "print(opcua_status_code('bad_nodeidunknown'), 'asyncua.server' in sys.modules)"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.split() == [str(0x80340000), "False"]


def test_only_the_asyncua_release_it_knows_is_served_without_its_server(tmp_path: Path) -> None:
    spec = importlib.util.find_spec("asyncua")
    assert spec is not None
    assert spec.origin is not None
    # The installed release is the one the finder knows: a new asyncua fails here, to be looked at.
    assert lean.is_known_init(Path(spec.origin))
    changed = tmp_path / "__init__.py"
    changed.write_text(
        Path(spec.origin).read_text(encoding="utf-8") + "from .tools import *\n", encoding="utf-8"
    )
    assert not lean.is_known_init(changed)


def test_only_the_asyncua_modules_it_knows_are_rewritten(tmp_path: Path) -> None:
    spec = importlib.util.find_spec("asyncua")
    assert spec is not None
    assert spec.submodule_search_locations
    root = Path(spec.submodule_search_locations[0])
    for name in lean.DEFERRED:
        path = root.joinpath(*name.split(".")[1:]).with_suffix(".py")
        # The installed release's modules are the ones reviewed: a new asyncua fails here, to be looked at.
        assert lean.deferring_code(name, path) is not None, name
        changed = tmp_path / path.name
        changed.write_text(path.read_text(encoding="utf-8") + "\n", encoding="utf-8")
        assert lean.deferring_code(name, changed) is None, name
