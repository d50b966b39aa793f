"""The C node library: built with the machine's compiler, its unit tests and fuzzer run here.

The unit tests compare every protocol vector built by the C codec with ``firmware/vectors.txt``
(which the Python codec produces, see test_fwb_protocol), so both sides emit the same bytes.
They run under AddressSanitizer and UndefinedBehaviorSanitizer, once with libsodium (Ed25519 on
the node) when it is installed and once without (hash-only).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from firmware_bridge.build import FIRMWARE_DIR, build_sim_node, have_sodium

pytestmark = pytest.mark.skipif(
    shutil.which("make") is None or shutil.which("cc") is None, reason="needs make and cc"
)

VECTORS = FIRMWARE_DIR / "vectors.txt"
FUZZ_ITERATIONS = 1_000_000


def _make(build: Path, *extra: str) -> None:
    result = subprocess.run(
        ["make", "-s", "-j2", "-C", str(FIRMWARE_DIR), f"BUILD={build}", *extra],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out: dict[str, Path] = {}
    plain = tmp_path_factory.mktemp("fwb-hash-only")
    _make(plain, "SODIUM=0", f"{plain}/test_fwb", f"{plain}/fuzz_fwb")
    out["hash-only"] = plain
    if have_sodium("cc"):
        sodium = tmp_path_factory.mktemp("fwb-sodium")
        _make(sodium, "SODIUM=1", f"{sodium}/test_fwb")
        out["sodium"] = sodium
    return out


def _run(binary: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(binary), *args], capture_output=True, text=True, check=False, timeout=timeout)


def test_c_unit_tests_pass_in_every_build(builds: dict[str, Path]) -> None:
    for name, build in builds.items():
        res = _run(build / "test_fwb", str(VECTORS))
        assert res.returncode == 0, f"{name}:\n{res.stdout}\n{res.stderr}"
        m = re.search(r"^(\d+) passed, (\d+) failed$", res.stdout, re.MULTILINE)
        assert m is not None, res.stdout
        passed, failed = int(m.group(1)), int(m.group(2))
        assert failed == 0
        # The sodium build adds the signature checks (and the RFC 8032 cross-check).
        assert passed >= (200 if name == "sodium" else 195), res.stdout
        assert "vectors: 18 identical" in res.stdout
        assert ("libsodium" in res.stdout) == (name == "sodium")


def test_c_unit_tests_notice_a_changed_vector(builds: dict[str, Path], tmp_path: Path) -> None:
    text = VECTORS.read_text(encoding="ascii").replace(
        "reboot 0501503d1203832c00", "reboot 0501503d1203832d00"
    )
    changed = tmp_path / "vectors.txt"
    changed.write_text(text, encoding="ascii")
    res = _run(builds["hash-only"] / "test_fwb", str(changed))
    assert res.returncode == 1
    assert "vector reboot differs" in res.stderr


def test_c_decoder_fuzz_a_million_frames_under_sanitizers(builds: dict[str, Path]) -> None:
    res = _run(builds["hash-only"] / "fuzz_fwb", str(FUZZ_ITERATIONS), "20240611")
    assert res.returncode == 0, res.stdout + res.stderr
    m = re.search(
        r"(\d+) iterations, (\d+) bytes, (\d+) clean frames all recovered, (\d+) damaged", res.stdout
    )
    assert m is not None, res.stdout
    iterations, total_bytes, clean, damaged = map(int, m.groups())
    assert iterations == FUZZ_ITERATIONS
    assert total_bytes > 50_000_000
    assert clean > FUZZ_ITERATIONS // 5
    assert damaged > FUZZ_ITERATIONS // 3
    assert f"{FUZZ_ITERATIONS} passed, 0 failed" in res.stdout


def test_sim_node_builds_with_and_without_libsodium(tmp_path: Path) -> None:
    plain = build_sim_node(tmp_path, sodium=False)
    assert plain.exists()
    assert build_sim_node(tmp_path, sodium=False) == plain  # cached
    res = _run(plain, "--bogus")
    assert res.returncode == 2
    assert "usage: sim_node" in res.stderr
    if have_sodium("cc"):
        assert build_sim_node(sodium=True).name.endswith("-sodium")  # the cache the other tests use
