"""The driver registry: every driver folder is registered, laid out as agreed, and documented."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from drivers import REGISTRY
from drivers.sim.driver import SimDriver
from gateway.config import COMMON_SOURCE_KEYS
from gateway.contracts import SourceInfo

DRIVERS = Path(__file__).resolve().parent.parent / "drivers"
FOLDERS = sorted(p.name for p in DRIVERS.iterdir() if (p / "driver.py").is_file())
TOML_BLOCK = re.compile(r"^```toml[ \t]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _sample_sources(name: str) -> list[dict[str, Any]]:
    readme = (DRIVERS / name / "README.md").read_text(encoding="utf-8")
    blocks = TOML_BLOCK.findall(readme)
    assert blocks, f"drivers/{name}/README.md: no ```toml sample config block"
    sources: list[dict[str, Any]] = []
    for block in blocks:
        sources.extend(tomllib.loads(block).get("sources", []))
    return sources


def test_there_are_drivers() -> None:
    assert "sim" in FOLDERS


@pytest.mark.parametrize("name", FOLDERS)
def test_every_driver_folder_is_registered_and_laid_out(name: str) -> None:
    assert name in REGISTRY, f"drivers/{name}/ has a driver.py but no line in drivers/__init__.py REGISTRY"
    spec = REGISTRY[name]
    assert spec.name == name
    assert spec.summary
    for part in ("protocol.py", "config.py", "README.md", "__init__.py"):
        assert (DRIVERS / name / part).is_file(), f"drivers/{name}/{part} is missing"


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_registered_driver_has_a_folder(name: str) -> None:
    assert name in FOLDERS, f"REGISTRY has {name!r} but drivers/{name}/driver.py does not exist"


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_config_model_is_strict_and_leaves_the_common_keys_to_the_core(name: str) -> None:
    model = REGISTRY[name].config_model
    assert model.model_config.get("extra") == "forbid", f"{model.__name__} must reject unknown keys"
    assert not set(model.model_fields) & set(COMMON_SOURCE_KEYS)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_readme_sample_config_validates(name: str) -> None:
    sources = _sample_sources(name)
    assert sources, f"drivers/{name}/README.md: the toml block has no [[sources]] table"
    for table in sources:
        assert table.get("driver") == name
        assert {"name", "subject"} <= table.keys()
        own = {k: v for k, v in table.items() if k not in COMMON_SOURCE_KEYS}
        REGISTRY[name].config_model.model_validate(own)
        # A key the model does not know is caught, so the sample really is checked key by key.
        with pytest.raises(ValueError, match="not_a_key"):
            REGISTRY[name].config_model.model_validate({**own, "not_a_key": 1})


def test_sim_factory_builds_a_driver_from_its_readme_sample() -> None:
    for table in _sample_sources("sim"):
        cfg = REGISTRY["sim"].config_model.model_validate(
            {k: v for k, v in table.items() if k not in COMMON_SOURCE_KEYS}
        )
        driver = REGISTRY["sim"].factory(SourceInfo(table["name"], table["subject"], table["kind"]), cfg)
        assert isinstance(driver, SimDriver)
        streams = driver.streams
        assert {st.device for st in streams.values()} == {table["device"]}
        assert {st.subject for st in streams.values()} == {table["subject"]}
