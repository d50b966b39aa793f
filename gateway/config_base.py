"""The base of every config section and the path types they share (no section of its own).

Kept apart from ``gateway.config`` so sections defined elsewhere (the uplink's, the drivers')
build on it without importing the whole config, and the whole config can import them.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError


def secret_file_problem(path: Path, *, must_exist: bool = True) -> tuple[str, str] | None:
    """What is wrong with a secret file as (expected, found), or None when it is fine."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return (
            ("an existing secret file (create it with mode 0600)", f"no file at {path}")
            if must_exist
            else None
        )
    except OSError as exc:
        return ("a secret file the gateway can read", f"{path}: {exc.strerror}")
    if not stat.S_ISREG(st.st_mode):
        return ("a regular file", f"{path} is not one")
    if st.st_mode & 0o077:
        return (
            f"a file only its owner can read (run 'chmod 600 {path}')",
            f"mode {stat.S_IMODE(st.st_mode):04o}",
        )
    return None


def _secret_validator(must_exist: bool) -> AfterValidator:
    def check(path: Path) -> Path:
        problem = secret_file_problem(path, must_exist=must_exist)
        if problem:
            expected, found = problem
            raise PydanticCustomError("secret_file", "{expected}", {"expected": expected, "found": found})
        return path

    return AfterValidator(check)


#: A path in a config: TOML has no path type, so strings are accepted here (and only here).
PathField = Annotated[Path, Field(strict=False)]
#: A path to a secret that must exist with mode 0600 (or stricter).
SecretFile = Annotated[Path, Field(strict=False), _secret_validator(True)]
#: A path to a secret the gateway creates on first start; if it exists it must be 0600.
CreatableSecretFile = Annotated[Path, Field(strict=False), _secret_validator(False)]


class ConfigModel(BaseModel):
    """Base of every config section, the drivers' included: strict types, unknown keys refused.

    Strict: TOML has real types, so "30" for a number or "yes" for a boolean is a mistake to
    report, not to guess at.  Use :data:`PathField` for paths.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
