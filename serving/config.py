"""Configuration: TOML file, then ``MODELD_<SECTION>__<KEY>`` env overrides, then CLI flags.

Everything is validated at once; :class:`ConfigProblems` carries every problem with its key path.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from loader.api import SourceOptions
from loader.cache import VERIFY_MODES
from loader.deps import MATCHES, POLICIES, Policy
from loader.manager import SWAP_POLICIES, RouteSpec, SwapPolicy
from loader.uri import parse_uri

ENV_PREFIX = "MODELD_"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
#: Where the cache lives when ``cache.dir`` is not set (before ``~/.cache/modeld``).
CACHE_DIR_ENV = "MODELD_CACHE_DIR"
#: ``mlflow models serve``'s own variables, meaning what they mean to MLflow.
SERVING_MODEL_CONFIG_ENV = "SERVING_MODEL_CONFIG"
MLFLOW_TIMEOUT_ENV = "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"
MLFLOW_WORKERS_ENV = "MLFLOW_MODELS_WORKERS"
#: MLflow's defaults retry a refused connection 7 times with backoff (minutes); a serving
#: daemon must notice an outage in seconds and keep serving from its cache. MLflow reads these
#: only from the environment, at each request, so the daemon sets them (unless the user did)
#: once at start, in its own process: the library never touches the environment.
MLFLOW_HTTP_BOUNDS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}


def bound_mlflow_http_retries(env: dict[str, str] | None = None) -> None:
    """Bound MLflow's HTTP retries in this process unless the user already set them."""
    target = os.environ if env is None else env
    for key, value in MLFLOW_HTTP_BOUNDS.items():
        target.setdefault(key, value)


def _live() -> Any:
    """Marks a key that takes effect on a config reload, without a restart."""
    return {"live": True}


class ConfigProblems(Exception):
    """Every problem found in a configuration, one per line with its key path."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 64 * 1024 * 1024
    #: What one request may decode to (rows x columns), and its columns: checked before a
    #: CSV or Parquet body is parsed (its own metadata) and before a JSON one is built.
    max_cells: int = 20_000_000
    max_columns: int = 10_000
    request_timeout_s: float = 60.0
    #: A request body that has not fully arrived after this long: 408, connection closed.
    body_timeout_s: float = 30.0
    #: Open connections kept; more are closed at once (0: 80% of the descriptor limit).
    max_connections: int = 0
    drain_timeout_s: float = 30.0
    load_timeout_s: float = 600.0
    workers: int = 1
    max_batch_size: int = 32
    max_batch_delay_ms: float = 0.0
    predict_threads: int = field(default=1, metadata=_live())
    log_level: str = "INFO"
    log_format: str = "text"
    token: str = field(default="", repr=False)
    token_file: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    unix_socket: str = ""
    #: The Open Inference Protocol over gRPC on this port (0: off).
    grpc_port: int = 0
    #: Send the model's traceback as ``stack_trace`` in error bodies, as MLflow does (off:
    #: a traceback tells a caller about the server's code and files).
    stack_traces: bool = False


@dataclass(frozen=True)
class RegistryConfig:
    tracking_uri: str = ""
    registry_uri: str = ""
    poll_interval_s: float = field(default=10.0, metadata=_live())


@dataclass(frozen=True)
class CacheConfig:
    dir: str = ""
    max_bytes: int = 0
    keep_versions: int = 3
    verify: str = "size"
    snapshots: bool = True


@dataclass(frozen=True)
class DependenciesConfig:
    policy: str = "warn"
    match: str = "minor"
    ignore: tuple[str, ...] = ()


@dataclass(frozen=True)
class EnvironmentsConfig:
    build_timeout_s: float = 900.0
    max_bytes: int = 0
    parallel_builds: int = 1
    pythons: tuple[str, ...] = ()


@dataclass(frozen=True)
class AdminConfig:
    token: str = field(default="", repr=False)
    token_file: str = ""
    webhook_secret: str = field(default="", repr=False)
    webhook_max_age_s: float = 300.0


PAYLOAD_MODES = ("all", "request", "response")


@dataclass(frozen=True)
class PayloadLogConfig:
    """``[logging.payloads]``: sampled requests and responses, logged off the request path."""

    enabled: bool = False
    #: The share of predictions logged (0..1), each drawn at random.
    sample: float = 1.0
    #: ``all`` (request and response), ``request`` or ``response``.
    mode: str = "all"
    #: A JSON Lines file (one event per line), rotated at ``file_max_bytes``.
    file: str = ""
    file_max_bytes: int = 100 * 1024 * 1024
    #: Rotated files kept beside it (``FILE.1`` is the newest).
    file_backups: int = 5
    #: An HTTP sink: CloudEvents as KServe's logger sends them, batched.
    url: str = ""
    #: The CloudEvents ``source`` attribute.
    source: str = "modeld"
    batch_size: int = 64
    flush_interval_s: float = 1.0
    timeout_s: float = 5.0
    #: Events waiting for the sinks; more are dropped (and counted), never waited for.
    queue_size: int = 10000
    #: A body larger than this is logged without its content (its size only).
    max_body_bytes: int = 64 * 1024
    #: JSON object keys whose values are logged as "<redacted>", at any depth.
    redact_fields: tuple[str, ...] = ()
    #: Request headers logged as "<redacted>" (besides Authorization, Cookie and the like).
    redact_headers: tuple[str, ...] = ()


#: Where a split's sticky key is read: a request header or a query parameter.
STICKY_SOURCES = ("header", "query")
ARM_SEPARATOR = "@"


@dataclass(frozen=True)
class ArmConfig:
    """One arm of a route: a ref followed, cached, loaded and swapped as a route is."""

    name: str
    uri: str
    #: The share of the route's requests this arm answers (relative to the others').
    weight: float = 1.0
    #: A shadow arm answers nobody: it gets a copy of each request after the answer is sent.
    shadow: bool = False


@dataclass(frozen=True)
class ModelConfig:
    name: str
    uri: str
    default: bool = False
    swap: str = "availability"
    warmup: bool = True
    warmup_payload: str = ""
    predict_threads: int = 0  # 0: server.predict_threads
    #: This model's dependency policy ("" = dependencies.policy).
    dependency_policy: str = ""
    #: ``mlflow.pyfunc.load_model(model_config=...)`` (a TOML table).
    model_config: dict[str, Any] | None = field(default=None, hash=False)
    #: Traffic between refs: each request goes to one arm by weight (and a copy to each
    #: shadow arm). Empty: the route serves ``uri`` alone.
    arms: tuple[ArmConfig, ...] = ()
    #: ``header:NAME`` or ``query:NAME``: the same key always lands on the same arm.
    sticky: str = ""
    #: Shadow copies waiting or running; more are dropped (counted), never waited for.
    mirror_queue: int = 64

    @property
    def primary(self) -> ArmConfig | None:
        """The arm whose readiness is the route's: the first that is not a shadow."""
        return next((a for a in self.arms if not a.shadow), None)

    def arm_route(self, arm: ArmConfig) -> str:
        """The manager route of one arm (``fraud@challenger``: addressable directly too)."""
        return f"{self.name}{ARM_SEPARATOR}{arm.name}"

    @property
    def warmup_example(self) -> dict[str, Any] | None:
        """The configured warm-up request (MLflow's JSON format), else None."""
        return json.loads(self.warmup_payload) if self.warmup_payload else None

    def route_specs(self) -> list[RouteSpec]:
        """What the manager serves for this entry (``set_routes``): one route, or one per arm."""
        if not self.arms:
            return [self.route_spec()]
        return [
            dataclasses.replace(self.route_spec(), name=self.arm_route(arm), uri=arm.uri)
            for arm in self.arms
        ]

    def route_spec(self) -> RouteSpec:
        """The manager's route for this entry without arms."""
        return RouteSpec(
            self.name,
            self.uri,
            cast(SwapPolicy, self.swap),
            self.warmup,
            self.warmup_example,
            self.model_config,
            cast(Policy, self.dependency_policy) or None,
        )


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    dependencies: DependenciesConfig = field(default_factory=DependenciesConfig)
    environments: EnvironmentsConfig = field(default_factory=EnvironmentsConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    logging_payloads: PayloadLogConfig = field(default_factory=PayloadLogConfig)
    models: tuple[ModelConfig, ...] = ()
    path: str | None = None

    @property
    def default_model(self) -> str | None:
        """The route ``POST /invocations`` answers: the only one, or the one marked default."""
        marked = [m.name for m in self.models if m.default]
        if marked:
            return marked[0]
        return self.models[0].name if len(self.models) == 1 else None

    def source_options(self) -> SourceOptions:
        """The pipeline this config describes (the daemon and the operator commands build
        theirs from the same settings)."""
        c, d, e = self.cache, self.dependencies, self.environments
        return SourceOptions(
            cache_dir=c.dir or None,
            tracking_uri=self.registry.tracking_uri or None,
            registry_uri=self.registry.registry_uri or None,
            dependency_policy=d.policy,  # type: ignore[arg-type]
            dependency_match=d.match,  # type: ignore[arg-type]
            dependency_ignore=d.ignore,
            verify=c.verify,  # type: ignore[arg-type]
            max_cache_bytes=c.max_bytes or None,
            keep_versions=c.keep_versions or None,
            snapshots=c.snapshots,
            env_build_timeout_s=e.build_timeout_s,
            env_max_bytes=e.max_bytes or None,
            env_parallel_builds=e.parallel_builds,
            env_pythons=e.pythons,
        )

    def route_specs(self) -> list[RouteSpec]:
        return [spec for m in self.models for spec in m.route_specs()]

    def model(self, route: str) -> ModelConfig | None:
        """The entry serving manager route ``route`` (a plain route, or one of its arms)."""
        for m in self.models:
            if m.name == route or (m.arms and any(m.arm_route(a) == route for a in m.arms)):
                return m
        return None

    def optional_routes(self) -> set[str]:
        """Arm routes whose readiness is not their route's (all but each primary arm)."""
        return {m.arm_route(a) for m in self.models for a in m.arms if a is not m.primary}

    def predict_threads(self, route: str) -> int:
        """Predict threads of ``route``: its own setting, else ``server.predict_threads``."""
        model = self.model(route)
        return (model.predict_threads if model else 0) or self.server.predict_threads


def restart_needed(old: Config, new: Config) -> list[str]:
    """The sections whose change takes effect only after a restart (every key but those
    marked live: ``server.predict_threads``, ``registry.poll_interval_s``)."""
    changed = []
    for section in _SECTIONS:
        before, after = getattr(old, _attr(section)), getattr(new, _attr(section))
        for fld in dataclasses.fields(before):
            if not fld.metadata.get("live") and getattr(before, fld.name) != getattr(
                after, fld.name
            ):
                changed.append(section)
                break
    return changed


_SECTIONS = {
    "server": ServerConfig,
    "registry": RegistryConfig,
    "cache": CacheConfig,
    "dependencies": DependenciesConfig,
    "environments": EnvironmentsConfig,
    "admin": AdminConfig,
    "logging.payloads": PayloadLogConfig,
}


def _attr(section: str) -> str:
    """The :class:`Config` attribute of a section (``logging.payloads``: ``logging_payloads``)."""
    return section.replace(".", "_")


def _table(raw: dict[str, Any], section: str, problems: list[str]) -> dict[str, Any]:
    """The TOML table of a (dotted) section, {} when absent."""
    values: Any = raw
    for part in section.split("."):
        values = values.get(part, {}) if isinstance(values, dict) else {}
    if not isinstance(values, dict):
        problems.append(f"{section}: expected a table, got {type(values).__name__}")
        return {}
    return dict(values)


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    extra_models: list[str] | None = None,
) -> Config:
    """Build a :class:`Config` from a TOML file, env overrides and flag overrides.

    ``overrides`` maps ``section.key`` to a value (from CLI flags); ``extra_models`` are
    ``-m`` values (``URI`` or ``NAME=URI``).

    Raises:
        ConfigProblems: every problem found, each with its key path.
    """
    env = os.environ if env is None else env
    problems: list[str] = []
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigProblems([f"{path}: cannot read ({exc.strerror or exc})"]) from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigProblems([f"{path}: not valid TOML ({exc})"]) from exc
    tops = {name.split(".")[0] for name in _SECTIONS}
    for key in raw:
        if key not in tops and key != "models":
            known = ", ".join([*_SECTIONS, "models"])
            problems.append(f"{key}: unknown section (known: {known})")
    logging_table = raw.get("logging", {})
    if isinstance(logging_table, dict):
        for key in logging_table:
            if key != "payloads":
                problems.append(f"logging.{key}: unknown section (known: logging.payloads)")

    sections = {}
    for name, cls in _SECTIONS.items():
        values = _table(raw, name, problems)
        for fld in dataclasses.fields(cls):
            env_key = f"{ENV_PREFIX}{_attr(name).upper()}__{fld.name.upper()}"
            if env_key in env:
                values[fld.name] = _from_env(env[env_key], fld.default)
            dotted = f"{name}.{fld.name}"
            if overrides and overrides.get(dotted) is not None:
                values[fld.name] = overrides[dotted]
        sections[_attr(name)] = _build(cls, name, values, problems)

    for name in ("server", "admin"):  # read token files once, not on every request
        section = sections[name]
        if section.token_file and not section.token:
            try:
                secret = Path(section.token_file).read_text(encoding="utf-8").strip()
            except OSError as exc:
                problems.append(f"{name}.token_file = {section.token_file!r}: cannot read ({exc})")
                continue
            if not secret:
                problems.append(f"{name}.token_file = {section.token_file!r}: the file is empty")
            sections[name] = dataclasses.replace(section, token=secret)
    if not sections["cache"].dir and env.get(CACHE_DIR_ENV):
        sections["cache"] = dataclasses.replace(sections["cache"], dir=env[CACHE_DIR_ENV])
    models = _models(raw.get("models", []), extra_models or [], problems, env)
    config = Config(**sections, models=tuple(models), path=str(path) if path else None)
    _validate(config, problems)
    if problems:
        raise ConfigProblems(problems)
    return config


def _from_env(text: str, default: Any) -> Any:
    if isinstance(default, bool):
        return text.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            return text
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            return text
    if isinstance(default, tuple):
        return tuple(p.strip() for p in text.split(",") if p.strip())
    return text


def _build(cls: type, section: str, values: dict[str, Any], problems: list[str]) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            problems.append(f"{section}.{key}: unknown key (known: {', '.join(known)})")
            continue
        default = known[key].default
        ok = _type_ok(value, default)
        if not ok:
            expected = type(default).__name__ if default is not dataclasses.MISSING else "value"
            if isinstance(default, tuple):
                expected = "a list of strings"
            shown = "<hidden>" if key in ("token", "webhook_secret") else repr(value)
            problems.append(f"{section}.{key} = {shown}: expected {expected}")
            continue
        if isinstance(default, tuple):
            value = tuple(value)
        if isinstance(default, float) and not isinstance(value, bool):
            value = float(value)
        kwargs[key] = value
    return cls(**kwargs)


def _type_ok(value: Any, default: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(default, tuple):
        return isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)
    if isinstance(default, str):
        return isinstance(value, str)
    return True


def _models(
    raw: Any, extra: list[str], problems: list[str], env: Mapping[str, str]
) -> list[ModelConfig]:
    models: list[ModelConfig] = []
    if not isinstance(raw, list):
        problems.append("models: expected [[models]] tables")
        raw = []
    for i, item in enumerate(raw):
        where = f"models[{i}]"
        if not isinstance(item, dict):
            problems.append(f"{where}: expected a table")
            continue
        unknown = set(item) - {f.name for f in dataclasses.fields(ModelConfig)}
        for key in sorted(unknown):
            known = ", ".join(f.name for f in dataclasses.fields(ModelConfig))
            problems.append(f"{where}.{key}: unknown key (known: {known})")
        arms = _arms(item.get("arms"), where, problems)
        if arms is None:
            continue
        uri = item.get("uri", arms[0].uri if arms else None)
        if not isinstance(uri, str):
            problems.append(f"{where}.uri: required, a model URI such as models:/iris/Production")
            continue
        if arms and "uri" in item:
            problems.append(f"{where}: give uri or arms, not both (each arm has its own uri)")
            continue
        name = item.get("name") or _default_name(uri)
        checks = {
            "name": (name, str),
            "default": (item.get("default", False), bool),
            "swap": (item.get("swap", "availability"), str),
            "warmup": (item.get("warmup", True), bool),
            "warmup_payload": (item.get("warmup_payload", ""), str),
            "predict_threads": (item.get("predict_threads", 0), int),
            "dependency_policy": (item.get("dependency_policy", ""), str),
            "model_config": (item.get("model_config", {}), dict),
            "sticky": (item.get("sticky", ""), str),
            "mirror_queue": (item.get("mirror_queue", 64), int),
        }
        bad = [
            k
            for k, (v, t) in checks.items()
            if not isinstance(v, t) or (t is int and isinstance(v, bool))
        ]
        for key in bad:
            problems.append(
                f"{where}.{key} = {checks[key][0]!r}: expected {checks[key][1].__name__}"
            )
        if bad:
            continue
        models.append(
            ModelConfig(
                name,
                uri,
                item.get("default", False),
                item.get("swap", "availability"),
                item.get("warmup", True),
                item.get("warmup_payload", ""),
                item.get("predict_threads", 0),
                item.get("dependency_policy", ""),
                item.get("model_config") or None,
                tuple(arms),
                item.get("sticky", ""),
                item.get("mirror_queue", 64),
            )
        )
    # The first -m model answers POST /invocations unless a [[models]] entry is the default.
    first_default = not any(m.default for m in models)
    serving_config = _serving_model_config(env, problems)
    for value in extra:
        name, sep, uri = value.partition("=")
        if not sep or "://" in name or name.startswith(("models:", "runs:", "file:", "/", ".")):
            name, uri = _default_name(value), value
        models.append(
            ModelConfig(name=name, uri=uri, default=first_default, model_config=serving_config)
        )
        first_default = False
    return models


def _arms(raw: Any, where: str, problems: list[str]) -> list[ArmConfig] | None:
    """A route's ``arms`` (None when they are wrong: the problems say why)."""
    if raw is None:
        return []
    if not isinstance(raw, list) or not raw:
        example = '{name = "champion", uri = "models:/fraud@champion", weight = 90}'
        problems.append(f"{where}.arms: expected a list of tables such as {example}")
        return None
    arms, ok = [], True
    for j, arm in enumerate(raw):
        at = f"{where}.arms[{j}]"
        if not isinstance(arm, dict):
            problems.append(f"{at}: expected a table")
            ok = False
            continue
        unknown = sorted(set(arm) - {f.name for f in dataclasses.fields(ArmConfig)} - {"ref"})
        for key in unknown:
            problems.append(f"{at}.{key}: unknown key (known: name, uri, weight, shadow)")
        ok = ok and not unknown
        uri = arm.get("uri", arm.get("ref"))  # ref: the and KServe's word for it
        weight, shadow = arm.get("weight", 1.0), arm.get("shadow", False)
        name = arm.get("name") or (_arm_name(uri) if isinstance(uri, str) else "")
        if not isinstance(uri, str):
            problems.append(f"{at}.uri: required, a model URI such as models:/fraud@challenger")
        elif not isinstance(name, str) or not name or not _ARM_NAME.fullmatch(name):
            problems.append(f"{at}.name = {name!r}: expected letters, digits, - or _")
        elif not isinstance(weight, int | float) or isinstance(weight, bool) or weight < 0:
            problems.append(f"{at}.weight = {weight!r}: expected a number >= 0")
        elif not isinstance(shadow, bool):
            problems.append(f"{at}.shadow = {shadow!r}: expected true or false")
        else:
            arms.append(ArmConfig(name, uri, float(weight), shadow))
            continue
        ok = False
    names = [a.name for a in arms]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"{where}.arms: two arms named {dup!r} (give each a name)")
        ok = False
    if ok and not any(not a.shadow and a.weight > 0 for a in arms):
        problems.append(f"{where}.arms: no arm answers (every arm is a shadow or weighs 0)")
        ok = False
    return arms if ok else None


_ARM_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _arm_name(uri: str) -> str:
    """An arm's default name: its ref's alias, stage or version (``champion``, ``3``)."""
    tail = uri.rstrip("/").rsplit("/", 1)[-1]
    return tail.rsplit("@", 1)[-1] if "@" in tail else tail


def _serving_model_config(env: Mapping[str, str], problems: list[str]) -> dict[str, Any] | None:
    """``SERVING_MODEL_CONFIG``: the JSON object ``mlflow models serve`` passes to
    ``load_model(model_config=)``; modeld gives it to the models of ``-m`` flags."""
    text = env.get(SERVING_MODEL_CONFIG_ENV)
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        problems.append(f"{SERVING_MODEL_CONFIG_ENV}: not valid JSON ({exc})")
        return None
    if not isinstance(value, dict):
        problems.append(f"{SERVING_MODEL_CONFIG_ENV}: expected a JSON object")
        return None
    return value


def _default_name(uri: str) -> str:
    """The registered model name, a logged model's id, else the directory name of a local
    model (a run's artifact path: its last part). For a URI that does not parse, a best guess
    (its problem is reported once, on the URI, not again on the name)."""
    try:
        ref = parse_uri(uri)
    except Exception:
        head, _, rest = uri.partition(":/")
        guess = rest.lstrip("/").split("/")[0].split("@")[0] if head == "models" else ""
        return guess or Path(uri.rstrip("/")).name or "model"
    if ref.name:
        return ref.name
    if ref.model_id:
        return ref.model_id
    if ref.path:
        return Path(ref.path).name
    return uri


def _validate(config: Config, problems: list[str]) -> None:
    s = config.server
    if not 0 <= s.port <= 65535:
        problems.append(f"server.port = {s.port}: expected 0..65535")
    if s.workers > 1 and s.unix_socket:
        problems.append("server.workers > 1 needs a TCP port: one Unix socket cannot be shared")
    if s.workers > 1 and s.port == 0:
        problems.append("server.workers > 1 needs a fixed server.port (not 0)")
    if s.max_connections < 0:
        problems.append(f"server.max_connections = {s.max_connections}: expected >= 0")
    for key in (
        "max_body_bytes",
        "max_cells",
        "max_columns",
        "max_batch_size",
        "workers",
        "predict_threads",
    ):
        if getattr(s, key) < 1:
            problems.append(f"server.{key} = {getattr(s, key)}: expected >= 1")
    for key in ("request_timeout_s", "body_timeout_s", "drain_timeout_s", "load_timeout_s"):
        if getattr(s, key) <= 0:
            problems.append(f"server.{key} = {getattr(s, key)}: expected > 0")
    if s.max_batch_delay_ms < 0:
        problems.append(f"server.max_batch_delay_ms = {s.max_batch_delay_ms}: expected >= 0")
    if s.log_level.upper() not in LOG_LEVELS:
        problems.append(f"server.log_level = {s.log_level!r}: expected one of {LOG_LEVELS}")
    if s.log_format not in ("text", "json"):
        problems.append(f"server.log_format = {s.log_format!r}: expected text or json")
    _validate_payload_log(config.logging_payloads, problems)
    for m in config.models:
        if m.sticky and (
            m.sticky.partition(":")[0] not in STICKY_SOURCES or not m.sticky.partition(":")[2]
        ):
            problems.append(
                f"models.{m.name}.sticky = {m.sticky!r}: expected header:NAME or query:NAME"
            )
        if m.sticky and not m.arms:
            problems.append(f"models.{m.name}.sticky: only a route with arms has a choice")
        if m.mirror_queue < 1:
            problems.append(f"models.{m.name}.mirror_queue = {m.mirror_queue}: expected >= 1")
    names = {m.name for m in config.models}
    for m in config.models:
        for arm in m.arms:
            if m.arm_route(arm) in names:
                problems.append(
                    f"models.{m.name}.arms: arm {arm.name!r}'s route {m.arm_route(arm)!r} is "
                    "also a model's name"
                )
            try:
                parse_uri(arm.uri)
            except Exception as exc:
                problems.append(f"models.{m.name}.arms ({arm.name}).uri: {exc}")
    if config.registry.poll_interval_s <= 0:
        problems.append(
            f"registry.poll_interval_s = {config.registry.poll_interval_s}: expected > 0"
        )
    if bool(s.ssl_certfile) != bool(s.ssl_keyfile):
        problems.append("server.ssl_certfile and server.ssl_keyfile: give both or neither")
    for key in ("ssl_certfile", "ssl_keyfile"):
        if getattr(s, key) and not Path(getattr(s, key)).is_file():
            problems.append(f"server.{key} = {getattr(s, key)!r}: no such file")
    admin = config.admin
    if admin.webhook_max_age_s <= 0:
        problems.append(f"admin.webhook_max_age_s = {admin.webhook_max_age_s}: expected > 0")
    if config.cache.max_bytes < 0:
        problems.append(f"cache.max_bytes = {config.cache.max_bytes}: expected >= 0 (0: no limit)")
    if config.cache.keep_versions < 0:
        problems.append(
            f"cache.keep_versions = {config.cache.keep_versions}: expected >= 0 (0: keep all)"
        )
    if config.cache.verify not in VERIFY_MODES:
        problems.append(f"cache.verify = {config.cache.verify!r}: expected one of {VERIFY_MODES}")
    d = config.dependencies
    if d.policy not in POLICIES:
        problems.append(f"dependencies.policy = {d.policy!r}: expected one of {POLICIES}")
    if d.match not in MATCHES:
        problems.append(f"dependencies.match = {d.match!r}: expected one of {MATCHES}")
    e = config.environments
    if e.build_timeout_s <= 0:
        problems.append(f"environments.build_timeout_s = {e.build_timeout_s}: expected > 0")
    if e.max_bytes < 0:
        problems.append(f"environments.max_bytes = {e.max_bytes}: expected >= 0 (0: no limit)")
    if e.parallel_builds < 1:
        problems.append(f"environments.parallel_builds = {e.parallel_builds}: expected >= 1")
    seen: set[str] = set()
    for i, m in enumerate(config.models):
        where = f"models[{i}] ({m.name})"
        try:
            parse_uri(m.uri)
        except Exception as exc:
            problems.append(f"{where}.uri: {exc}")
        if not m.name or "/" in m.name or m.name.strip() != m.name:
            problems.append(f"{where}.name = {m.name!r}: expected a route name without '/'")
        if m.name in seen:
            problems.append(f"{where}.name = {m.name!r}: used by two models; names must differ")
        seen.add(m.name)
        if m.predict_threads < 0:
            problems.append(
                f"{where}.predict_threads = {m.predict_threads}: expected >= 1, or 0 for "
                "server.predict_threads"
            )
        if m.swap not in SWAP_POLICIES:
            problems.append(f"{where}.swap = {m.swap!r}: expected one of {SWAP_POLICIES}")
        if m.dependency_policy and m.dependency_policy not in POLICIES:
            problems.append(
                f"{where}.dependency_policy = {m.dependency_policy!r}: expected one of "
                f'{POLICIES}, or "" for dependencies.policy'
            )
        if m.warmup_payload:
            try:
                ok = isinstance(json.loads(m.warmup_payload), dict)
            except ValueError:
                ok = False
            if not ok:
                problems.append(
                    f"{where}.warmup_payload: expected a JSON object in MLflow's "
                    'request format, e.g. {"inputs": [[1, 2]]}'
                )
    if sum(m.default for m in config.models) > 1:
        problems.append("models: more than one model has default = true")


def _validate_payload_log(p: PayloadLogConfig, problems: list[str]) -> None:
    where = "logging.payloads"
    if not 0 <= p.sample <= 1:
        problems.append(f"{where}.sample = {p.sample}: expected 0..1")
    if p.mode not in PAYLOAD_MODES:
        problems.append(f"{where}.mode = {p.mode!r}: expected one of {', '.join(PAYLOAD_MODES)}")
    if p.enabled and not (p.file or p.url):
        problems.append(f"{where}.enabled = true needs a sink: {where}.file or {where}.url")
    if p.url and not p.url.startswith(("http://", "https://")):
        problems.append(f"{where}.url = {p.url!r}: expected an http:// or https:// URL")
    for key in ("file_max_bytes", "batch_size", "queue_size", "max_body_bytes"):
        if getattr(p, key) < 1:
            problems.append(f"{where}.{key} = {getattr(p, key)}: expected >= 1")
    if p.file_backups < 0:
        problems.append(f"{where}.file_backups = {p.file_backups}: expected >= 0")
    for key in ("flush_interval_s", "timeout_s"):
        if getattr(p, key) <= 0:
            problems.append(f"{where}.{key} = {getattr(p, key)}: expected > 0")
