"""The install steps of systemd/README.md, run as written where this machine allows it.

sysusers and tmpfiles run for real into a scratch root (``--root``); every file an ``install``
line copies must exist in the source tree; the extras named must exist.  The ``systemctl`` and
``runuser`` lines need systemd as PID 1 and the user on the host, so they are only checked to
name the files installed above.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "systemd" / "README.md"


def _steps() -> list[list[str]]:
    text = README.read_text()
    block = text.split("```sh\n", 1)[1].split("```", 1)[0]
    return [
        shlex.split(line, comments=True) for line in block.splitlines() if shlex.split(line, comments=True)
    ]


def test_every_installed_file_exists_and_extras_are_known() -> None:
    steps = _steps()
    installs = [s for s in steps if s[0] == "install"]
    assert len(installs) >= 4
    for step in installs:
        src = ROOT / step[-2]
        assert src.is_file(), f"systemd/README.md installs {step[-2]}, which is not in the source tree"
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    (pip,) = [s for s in steps if "pip" in s[0]]
    named = re.fullmatch(r"\.\[(.*)\]", pip[-1])
    assert named is not None, pip
    assert set(named.group(1).split(",")) <= extras
    installed = {s[-1] for s in installs}
    for step in steps:
        if step[0] in {"systemd-sysusers", "systemd-tmpfiles"}:
            assert step[-1] in installed
    assert "/etc/systemd/system/edgetwin.service" in installed
    assert any(s[:3] == ["systemctl", "enable", "--now"] for s in steps)


@pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None, reason="needs systemd's tools (bash .ci/setup test)"
)
def test_sysusers_and_tmpfiles_steps_run_into_a_scratch_root(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    for tool, conf in (
        ("systemd-sysusers", "systemd/edgetwin.sysusers.conf"),
        ("systemd-tmpfiles", "systemd/edgetwin.tmpfiles.conf"),
    ):
        args = [
            tool,
            f"--root={tmp_path}",
            *(["--create"] if tool == "systemd-tmpfiles" else []),
            str(ROOT / conf),
        ]
        done = subprocess.run(args, capture_output=True, text=True, check=False, timeout=60)
        assert done.returncode == 0, done.stderr
    passwd = {
        line.split(":")[0]: line.split(":") for line in (tmp_path / "etc/passwd").read_text().splitlines()
    }
    groups = {
        line.split(":")[0]: line.split(":") for line in (tmp_path / "etc/group").read_text().splitlines()
    }
    uid, gid = int(passwd["edgetwin"][2]), int(groups["edgetwin"][2])
    assert "edgetwin" in groups["dialout"][3].split(",")
    for path, mode, owner in (
        ("etc/edgetwin", 0o1770, (0, gid)),
        ("etc/edgetwin/secrets", 0o1770, (0, gid)),
        ("var/lib/edgetwin", 0o700, (uid, gid)),
    ):
        st = (tmp_path / path).stat()
        assert (st.st_mode & 0o7777, (st.st_uid, st.st_gid)) == (mode, owner), path
