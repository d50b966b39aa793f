"""One TOML file, validated into typed objects; every problem reported at once.

Validation collects problems instead of stopping at the first, so a technician fixes a file in one
pass: each :class:`~gateway.errors.ConfigProblem` names the file, the key path
(``sources[2].rate_hz``), what was expected and what was found.  Unknown keys are errors - a typo
must never be silently ignored.  Secrets are never inline: keys that look like secrets must be
``*_file`` paths to files only the gateway's user can read.

The core validates the common keys of each ``[[sources]]`` table (``name``, ``driver``,
``subject``, ``kind``, ``enabled``); the driver's own ``config_model`` validates the rest, so the
core never imports a driver (the registry is passed in by the composition root).
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, Field, ValidationError, model_validator

from gateway.alarms.config import AlarmsSection
from gateway.config_base import ConfigModel, CreatableSecretFile, PathField
from gateway.contracts import DriverSpec, SourceInfo
from gateway.downlink.config import DownlinkSection
from gateway.errors import ConfigProblem, InvalidConfigError
from gateway.estimation.config import EstimatorsSection
from gateway.inference.build import ModelsSection
from gateway.observe.config import StatusSection
from gateway.sample import SENSOR_LOST_S
from gateway.uplink.config import MqttSection
from gateway.uplink.sparkplug.config import SparkplugSection

#: Key names that hold secrets; inline values for them are refused (reference a file instead).
SECRET_KEY_NAMES = frozenset(
    {"password", "passwd", "secret", "token", "api_key", "apikey", "private_key", "key", "passphrase", "psk"}
)
#: Keys shared by every ``[[sources]]`` table; everything else belongs to the driver.
COMMON_SOURCE_KEYS = ("name", "driver", "subject", "kind", "enabled")


class GatewaySection(ConfigModel):
    name: str = Field("edgetwin", min_length=1, max_length=64)  # a local label, never sent
    state_dir: PathField = Path("/var/lib/edgetwin")


class PrivacySection(ConfigModel):
    # Created at first start in the state directory (mode 0600) when not given.
    site_key_file: CreatableSecretFile | None = None
    # What time leaves the gateway: "relative" (seconds since the site's origin, kept in the state
    # directory), "coarse" (the same, rounded down to coarsen_s) or "exact" (Unix time). Dates
    # finer than a year identify patients.
    time: Literal["relative", "coarse", "exact"] = "relative"
    coarsen_s: float = Field(60.0, gt=0, le=86400)


class PipelineSection(ConfigModel):
    window_s: float = Field(30.0, gt=0, le=3600)
    hop_s: float = Field(10.0, gt=0, le=3600)
    grace_s: float = Field(2.0, ge=0, le=60)  # wait for late samples before closing a window
    sensor_lost_s: float = Field(SENSOR_LOST_S, gt=0, le=3600)
    # After a sensor fault, good data must flow this long before it counts as restored, so a
    # flapping probe raises one fault and one restore, not a pair per flip; a loss is restored no
    # sooner than this after its alarm, so a device coming and going cannot flap either.
    # 0 restores at once.
    sensor_restore_s: float = Field(2.0, ge=0, le=60)


class OutboxSection(ConfigModel):
    path: PathField | None = None  # default: <state_dir>/outbox.db
    max_mb: float = Field(256.0, gt=0, le=1_000_000)
    synchronous: Literal["full", "normal"] = "full"  # full survives power cuts; normal only crashes
    feature_max_age_h: float = Field(168.0, gt=0)


class UplinkSection(ConfigModel):
    # "mqtt" publishes to the cloud twin over TLS; "local" shows what would leave the gateway
    # (decoded records, one JSON line each) on stdout or into a file; "none" keeps everything in
    # the outbox.
    kind: Literal["local", "mqtt", "none"] = "local"
    path: PathField | None = None  # local: a JSON-lines file instead of stdout
    mqtt: MqttSection | None = None  # [uplink.mqtt], for kind = "mqtt"
    # What goes on the wire with kind = "mqtt": SenML-CBOR records for the twin, or a Sparkplug B
    # edge node ([uplink.sparkplug]) for SCADA hosts.
    encoding: Literal["senml", "sparkplug"] = "senml"
    sparkplug: SparkplugSection = SparkplugSection()

    @model_validator(mode="after")
    def _mqtt_needs_its_table(self) -> Self:
        if self.kind == "mqtt" and self.mqtt is None:
            raise ValueError(
                'kind = "mqtt" needs an [uplink.mqtt] table (host, ca_file, cert_file, key_file)'
            )
        if self.encoding == "sparkplug" and (self.kind != "mqtt" or self.mqtt is None):
            raise ValueError('encoding = "sparkplug" needs kind = "mqtt" and an [uplink.mqtt] table')
        if self.encoding == "sparkplug" and self.mqtt is not None and self.mqtt.profile == "azure":
            raise ValueError(
                'encoding = "sparkplug" needs a broker with free topics: profile "azure" has one static '
                'topic; use another broker (for Azure: Event Grid\'s MQTT broker, profile "generic")'
            )
        return self


class LoggingSection(ConfigModel):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"
    # Raw subject ids, serial numbers and addresses in the logs instead of source names and
    # pseudonyms; for bench work only (a warning says so at start).
    identities: bool = False


class RuntimeSection(ConfigModel):
    # Both stay inside the systemd unit's TimeoutStopSec=30s and default TimeoutStartSec=90s.
    drain_deadline_s: float = Field(15.0, gt=0, le=25)  # SIGTERM -> exit within this
    start_timeout_s: float = Field(30.0, gt=0, le=60)  # READY at the latest after this
    # Free heap pages go back to the system a minute after READY and then this often (0: never).
    memory_trim_s: float = Field(600.0, ge=0, le=86_400)


class CoreConfig(ConfigModel):
    gateway: GatewaySection = GatewaySection()
    privacy: PrivacySection = PrivacySection()
    pipeline: PipelineSection = PipelineSection()
    outbox: OutboxSection = OutboxSection()
    uplink: UplinkSection = UplinkSection()
    logging: LoggingSection = LoggingSection()
    runtime: RuntimeSection = RuntimeSection()
    models: ModelsSection = ModelsSection()
    alarms: AlarmsSection = AlarmsSection()
    estimators: EstimatorsSection = EstimatorsSection()
    status: StatusSection = StatusSection()
    downlink: DownlinkSection = DownlinkSection()

    @property
    def site_key_path(self) -> Path:
        """Where the site key lives."""
        return self.privacy.site_key_file or self.gateway.state_dir / "site.key"

    @property
    def outbox_path(self) -> Path:
        """Where the outbox database lives."""
        return self.outbox.path or self.gateway.state_dir / "outbox.db"


class SourceCommon(ConfigModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    driver: str
    subject: str = Field(min_length=1, max_length=128)
    kind: Literal["medical", "industrial"] = "medical"
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class SourceEntry:
    """One validated ``[[sources]]`` table: its common keys and its driver's own config."""

    info: SourceInfo
    driver: str
    enabled: bool
    config: BaseModel

    def subjects(self) -> list[str]:
        """The subjects the source feeds: its own, or those its driver config binds devices to."""
        bound = getattr(self.config, "subjects", None)
        return bound(self.info.subject) if callable(bound) else [self.info.subject]


@dataclass(frozen=True, slots=True)
class Config:
    """A validated configuration file."""

    file: Path
    core: CoreConfig
    sources: tuple[SourceEntry, ...]


# -- turning pydantic's errors into problems a technician can act on ------------------------------


def _key_path(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _describe(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value) if len(value) <= 60 else repr(value[:57] + "...")
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


def _model_at(model: type[BaseModel], loc: Sequence[int | str]) -> type[BaseModel] | None:
    """The model class that owns the key at ``loc`` (to list the keys it does accept)."""
    current: type[BaseModel] | None = model
    for part in loc:
        if current is None:
            return None
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part)
        if field is None:
            return None
        current = _inner_model(field.annotation)
    return current


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


_EXPECTED = {
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_parsing": "a number",
    "float_type": "a number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "an array",
    "model_type": "a table",
    "model_attributes_type": "a table",
    "dict_type": "a table",
    "path_type": "a path string",
    "finite_number": "a finite number",
}


def _problem_from_error(
    file: str, model: type[BaseModel], prefix: Sequence[int | str], err: Any
) -> ConfigProblem:
    loc: tuple[int | str, ...] = tuple(prefix) + tuple(err["loc"])
    kind: str = err["type"]
    ctx: Mapping[str, Any] = err.get("ctx") or {}
    found = _describe(err.get("input"))
    if kind == "missing":
        return ConfigProblem(file, _key_path(loc), "this required key", "nothing")
    if kind == "extra_forbidden":
        owner = _model_at(model, err["loc"][:-1])
        names = set(owner.model_fields) if owner else set()
        if owner is CoreConfig:
            names.add("sources")
        known = ", ".join(sorted(names)) or "the documented keys"
        return ConfigProblem(
            file, _key_path(loc), f"one of the known keys ({known})", f"unknown key {loc[-1]!r}"
        )
    if kind == "literal_error":
        return ConfigProblem(file, _key_path(loc), f"one of {ctx.get('expected')}", found)
    if kind in {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}:
        sign = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[
            kind
        ]
        bound = next(iter(ctx.values()))
        shown = f"{bound:g}" if isinstance(bound, float) else str(bound)
        return ConfigProblem(file, _key_path(loc), f"a number {sign} {shown}", found)
    if kind == "string_too_short":
        return ConfigProblem(file, _key_path(loc), "a non-empty string", found)
    if kind == "string_too_long":
        return ConfigProblem(file, _key_path(loc), f"at most {ctx.get('max_length')} characters", found)
    if kind == "string_pattern_mismatch":
        return ConfigProblem(file, _key_path(loc), "letters, digits, '_', '.' or '-' only", found)
    if kind in _EXPECTED:
        return ConfigProblem(file, _key_path(loc), _EXPECTED[kind], found)
    if kind == "secret_file":
        return ConfigProblem(file, _key_path(loc), str(ctx["expected"]), str(ctx["found"]))
    if kind == "value_error":
        reason = str(ctx.get("error", err["msg"]))
        return ConfigProblem(file, _key_path(loc), "a valid value", f"{found} ({reason})")
    return ConfigProblem(file, _key_path(loc), err["msg"].lower(), found)


def _validate(
    file: str, model: type[BaseModel], data: Any, prefix: Sequence[int | str], problems: list[ConfigProblem]
) -> BaseModel | None:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        # A key already reported (inline secret, nan) is not reported twice.
        reported = {p.path for p in problems}
        for e in exc.errors():
            problem = _problem_from_error(file, model, prefix, e)
            if problem.path not in reported:
                problems.append(problem)
        return None


def _inline_secrets(file: str, data: Any, loc: tuple[int | str, ...], problems: list[ConfigProblem]) -> None:
    if isinstance(data, Mapping):
        for key, value in data.items():
            if key.lower() in SECRET_KEY_NAMES:
                problems.append(
                    ConfigProblem(
                        file,
                        _key_path((*loc, key)),
                        f'a file reference ({key}_file = "/etc/edgetwin/secrets/...", mode 0600); '
                        "secrets are never written inline",
                        "an inline secret",
                    )
                )
            else:
                _inline_secrets(file, value, (*loc, key), problems)
    elif isinstance(data, list):
        for i, item in enumerate(data):
            _inline_secrets(file, item, (*loc, i), problems)


def _non_finite(file: str, data: Any, loc: tuple[int | str, ...], problems: list[ConfigProblem]) -> None:
    # TOML allows nan and inf; no setting of ours means anything with them.
    if isinstance(data, float) and not math.isfinite(data):
        problems.append(ConfigProblem(file, _key_path(loc), "a finite number", repr(data)))
    elif isinstance(data, Mapping):
        for key, value in data.items():
            _non_finite(file, value, (*loc, key), problems)
    elif isinstance(data, list):
        for i, item in enumerate(data):
            _non_finite(file, item, (*loc, i), problems)


def validate(data: Mapping[str, Any], file: str, registry: Mapping[str, DriverSpec]) -> Config:
    """Validate parsed TOML; raise InvalidConfigError listing every problem found."""
    problems: list[ConfigProblem] = []
    _inline_secrets(file, data, (), problems)
    _non_finite(file, data, (), problems)
    core_data = {k: v for k, v in data.items() if k != "sources"}
    core = _validate(file, CoreConfig, core_data, (), problems)

    raw_sources = data.get("sources", [])
    entries: list[SourceEntry] = []
    if not isinstance(raw_sources, list):
        problems.append(
            ConfigProblem(file, "sources", "an array of tables ([[sources]])", _describe(raw_sources))
        )
        raw_sources = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(raw_sources):
        if not isinstance(raw, Mapping):
            problems.append(ConfigProblem(file, f"sources[{i}]", "a table", _describe(raw)))
            continue
        common_data = {k: v for k, v in raw.items() if k in COMMON_SOURCE_KEYS}
        own = {k: v for k, v in raw.items() if k not in COMMON_SOURCE_KEYS}
        common = _validate(file, SourceCommon, common_data, ("sources", i), problems)
        driver_name = raw.get("driver")
        spec = registry.get(driver_name) if isinstance(driver_name, str) else None
        if isinstance(driver_name, str) and spec is None:
            known = ", ".join(sorted(registry)) or "(none installed)"
            problems.append(
                ConfigProblem(
                    file, f"sources[{i}].driver", f"one of the drivers ({known})", repr(driver_name)
                )
            )
        own_cfg = _validate(file, spec.config_model, own, ("sources", i), problems) if spec else None
        if isinstance(common, SourceCommon):
            if common.name in seen:
                problems.append(
                    ConfigProblem(
                        file,
                        f"sources[{i}].name",
                        f"a name not used by another source (sources[{seen[common.name]}] has it)",
                        repr(common.name),
                    )
                )
            seen.setdefault(common.name, i)
            if own_cfg is not None:
                info = SourceInfo(common.name, common.subject, common.kind)
                entries.append(SourceEntry(info, common.driver, common.enabled, own_cfg))
    if isinstance(core, CoreConfig) and core.pipeline.hop_s > core.pipeline.window_s:
        problems.append(
            ConfigProblem(
                file,
                "pipeline.hop_s",
                f"at most window_s ({core.pipeline.window_s:g}), or samples between windows are never used",
                repr(core.pipeline.hop_s),
            )
        )
    if isinstance(core, CoreConfig) and core.uplink.encoding == "sparkplug" and core.downlink.trust_file:
        problems.append(
            ConfigProblem(
                file,
                "downlink.trust_file",
                'unset with [uplink] encoding = "sparkplug": the downlink rides on the SenML uplink\'s '
                'session; remove it or use encoding = "senml"',
                repr(str(core.downlink.trust_file)),
            )
        )
    if problems or not isinstance(core, CoreConfig):
        raise InvalidConfigError(file, problems)
    return Config(Path(file), core, tuple(entries))


def load(path: Path, registry: Mapping[str, DriverSpec]) -> Config:
    """Read and validate a config file; raise InvalidConfigError with every problem."""
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise InvalidConfigError(
            file, [ConfigProblem(file, "(file)", "an existing file", "no such file")]
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidConfigError(
            file, [ConfigProblem(file, "(file)", "a readable UTF-8 file", str(exc))]
        ) from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidConfigError(file, [ConfigProblem(file, "(syntax)", "valid TOML", str(exc))]) from exc
    return validate(data, file, registry)
