"""Router configuration: the schema of ``config.yaml`` (fd-router keys plus kvrouter's own).

Each key is declared once, as a field of its section's dataclass: the field name is the YAML
key with ``-`` replaced by ``_``, the field default is the key's default, and
``metadata["check"]`` validates and converts a YAML value (or raises ``_Invalid(reason)``).
The schema :func:`load_config` validates against is derived from these fields. Defaults are
fd-router's and kvrouter's; validation follows docs/fastdeploy.md#configuration.

The scheduler keys of one policy are grouped under its name. The policy reads them through its
own config type (``kvrouter.policies``: ``from_config``), so they stay flat in the YAML
(``scheduler.kv-cost-miss-weight``) and on :class:`SchedulerConfig` (``kv_cost_miss_weight``).
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import yaml

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warn", "error")

MAX_WORKERS = 64
PORT_MISSING = "Failed to load config: failed to set router listen port"


class ConfigError(Exception):
    """A configuration problem that prevents startup; ``str(err)`` is the message to print."""


_LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", re.IGNORECASE)


def is_hostname(name: str) -> bool:
    """True for an RFC 1123 DNS host name (dot-separated labels, not all-numeric at the end)."""
    labels = name.split(".")
    return (
        len(name) <= 253
        and all(_LABEL_RE.fullmatch(label) for label in labels)
        and not labels[-1].isdigit()
    )


# --- value checkers: each returns the coerced value or raises _Invalid(reason) ---------------

Checker = Callable[[object], object]


class _Invalid(Exception):
    pass


_INT_RE = re.compile(r"[+-]?[0-9]+")
_FLOAT_RE = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    return str(value)


def _to_int(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _INT_RE.fullmatch(value.strip()):
        return int(value)
    raise _Invalid(f"must be an integer, got {_show(value)}")


def _to_float(value: object) -> float:
    number: float | None = None
    if ((isinstance(value, (int, float)) and not isinstance(value, bool))
            or (isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()))):
        number = float(value)
    if number is None or not math.isfinite(number):
        raise _Invalid(f"must be a number, got {_show(value)}")
    return number


def _ranged(
    convert: Callable[[object], float], lo: float, hi: float | None, strict: bool
) -> Checker:
    def check(value: object) -> object:
        number = convert(value)
        if hi is not None and not lo <= number <= hi:
            raise _Invalid(f"must be between {lo:g} and {hi:g}, got {_show(value)}")
        if strict and number <= lo:
            raise _Invalid(f"must be > {lo:g}, got {_show(value)}")
        if number < lo:
            raise _Invalid(f"must be >= {lo:g}, got {_show(value)}")
        return number

    return check


def _int(lo: int, hi: int | None = None) -> Checker:
    """Integer in ``[lo, hi]``; numeric strings accepted."""
    return _ranged(_to_int, lo, hi, strict=False)


def _num(lo: float, hi: float | None = None, *, strict: bool = False) -> Checker:
    """Number ``>= lo`` (``> lo`` if ``strict``), at most ``hi``; numeric strings accepted."""
    return _ranged(_to_float, lo, hi, strict)


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise _Invalid(f"must be a boolean, got {_show(value)}")


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"must be a string, got {_show(value)}")
    return value


def _label(value: object) -> str:
    if isinstance(value, (dict, list)):
        raise _Invalid(f"must be a string, got {_show(value)}")
    return str(value)


def _choice(*choices: str, fold: bool = False) -> Checker:
    def check(value: object) -> str:
        text = _text(value)
        key = text.lower() if fold else text
        if key not in choices:
            raise _Invalid(f"must be one of {', '.join(choices)}, got {_show(value)}")
        return key

    return check


def _policy(value: object) -> str:
    """A registered policy name (``kvrouter.policies.policy_names()``)."""
    # Imported here, not at the top: kvrouter.policies depends on this module (SchedulerConfig),
    # and loading it pulls in numpy and the prefix index, which reading a file does not need.
    from kvrouter.policies import policy_class

    name = _text(value)
    try:
        policy_class(name)
    except ValueError as exc:
        raise _Invalid(str(exc)) from None
    return name


def _bind_host(value: object) -> str:
    host = _text(value)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not is_hostname(host):
            raise _Invalid(f"must be an IP address or host name, got {_show(value)}") from None
    return host


def _endpoint(value: object) -> str:
    path = _text(value)
    if not path.startswith("/"):
        raise _Invalid(f"must start with '/', got {_show(value)}")
    return path


def _url(value: object) -> str:
    """An http(s) URL; a missing scheme means ``http://``
    (docs/fastdeploy.md#cache-aware-routing)."""
    url = _text(value)
    if url:
        parts = urlsplit(url if "://" in url else "http://" + url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise _Invalid(f"must be an http:// or https:// URL, got {_show(value)}")
    return url


# --- the sections: one field per key (default and check side by side) ----------------------


@dataclass
class ServerConfig:
    port: int | None = field(default=None, metadata={"check": _int(0, 65535)})
    host: str = field(default="0.0.0.0", metadata={"check": _bind_host})
    mode: str = field(default="release", metadata={"check": _choice("debug", "release", "test")})
    splitwise: bool = field(default=False, metadata={"check": _bool})
    name: str = field(default="", metadata={"check": _label})
    connect_timeout_secs: float = field(default=5.0, metadata={"check": _num(0)})
    first_byte_timeout_secs: float = field(default=600.0, metadata={"check": _num(0)})
    stream_idle_timeout_secs: float = field(default=300.0, metadata={"check": _num(0)})
    connect_retries: int = field(default=2, metadata={"check": _int(0)})
    max_body_mb: float = field(default=100.0, metadata={"check": _num(0, strict=True)})
    disaggregate_info_format: str = field(
        default="flat", metadata={"check": _choice("flat", "nested")})
    # worker processes (kvrouter.workers); 1 = one process
    workers: int = field(default=1, metadata={"check": _int(1, MAX_WORKERS)})


@dataclass
class SchedulerConfig:
    policy: str = field(default="request_num", metadata={"check": _policy})
    prefill_policy: str = field(default="process_tokens", metadata={"check": _policy})
    decode_policy: str = field(default="request_num", metadata={"check": _policy})
    eviction_interval_secs: float = field(default=60.0, metadata={"check": _num(0)})
    eviction_duration_mins: float = field(default=30.0, metadata={"check": _num(0)})
    cache_block_size: int = field(default=64, metadata={"check": _int(1)})
    tokenizer_url: str = field(default="", metadata={"check": _url})
    tokenizer_timeout_secs: float = field(default=2.0, metadata={"check": _num(0, strict=True)})
    tokenizer_path: str = field(default="", metadata={"check": _text})
    stats_interval_secs: float = field(default=5.0, metadata={"check": _num(0)})
    pd_retry_count: int = field(default=3, metadata={"check": _int(0)})
    pd_retry_exclude_decode: bool = field(default=True, metadata={"check": _bool})
    metrics_scrape_interval_secs: float = field(
        default=2.0, metadata={"check": _num(0, strict=True)})
    metrics_scrape_timeout_secs: float = field(
        default=1.0, metadata={"check": _num(0, strict=True)})
    cache_max_blocks: int = field(default=200_000, metadata={"check": _int(1)})
    # cache_aware, remote_cache_aware (policies.cache_aware.CacheAwareConfig)
    balance_abs_threshold: float = field(default=1.0, metadata={"check": _num(0)})
    balance_rel_threshold: float = field(default=0.2, metadata={"check": _num(0, 1)})
    hit_ratio_weight: float = field(default=1.0, metadata={"check": _num(0)})
    load_balance_weight: float = field(default=1.0, metadata={"check": _num(0)})
    # fd_metrics_score, fd_remote_metrics_score
    waiting_weight: float = field(default=1.0, metadata={"check": _num(0)})
    # sglang_cache_aware: sglang-* (policies.sglang.SglangConfig; SGLang router defaults)
    sglang_cache_threshold: float = field(default=0.3, metadata={"check": _num(0, 1)})
    sglang_balance_abs_threshold: float = field(default=64.0, metadata={"check": _num(0)})
    sglang_balance_rel_threshold: float = field(default=1.5, metadata={"check": _num(0)})
    sglang_miss_policy: str = field(
        default="min_load", metadata={"check": _choice("min_load", "smallest_tree")})
    # kv_cost: kv-cost-* (policies.kv_cost.KvCostConfig), and cache-block-size
    kv_cost_prefill_tokens_per_sec: float = field(
        default=12000.0, metadata={"check": _num(0, strict=True)})
    kv_cost_decode_weight: float = field(default=0.002, metadata={"check": _num(0)})
    kv_cost_exploration: float = field(default=0.01, metadata={"check": _num(0, 1)})
    kv_cost_miss_weight: float = field(default=2.0, metadata={"check": _num(0)})
    kv_cost_itl_weight: float = field(default=0.1, metadata={"check": _num(0)})
    kv_cost_transfer_tokens_per_sec: float = field(default=190000.0, metadata={"check": _num(0)})
    kv_cost_chars_per_token: float = field(default=4.0, metadata={"check": _num(0, strict=True)})


@dataclass
class ManagerConfig:
    register_path: str = field(default="", metadata={"check": _text})
    health_failure_threshold: int = field(default=1, metadata={"check": _int(1)})
    health_success_threshold: int = field(default=1, metadata={"check": _int(1)})
    health_check_timeout_secs: float = field(default=5.0, metadata={"check": _num(0, strict=True)})
    health_check_interval_secs: float = field(
        default=5.0, metadata={"check": _num(0, strict=True)})
    health_check_endpoint: str = field(default="/health", metadata={"check": _endpoint})
    unhealthy_removal_secs: float = field(default=300.0, metadata={"check": _num(0)})
    models_refresh_secs: float = field(default=60.0, metadata={"check": _num(0, strict=True)})


@dataclass
class LogConfig:
    level: str = field(default="info", metadata={"check": _choice(*LOG_LEVELS, fold=True)})
    output: str = field(default="stdout", metadata={"check": _choice("stdout", "file")})
    max_age_days: float = field(default=7.0, metadata={"check": _num(0)})
    max_total_size_mb: float = field(default=500.0, metadata={"check": _num(0)})
    cleanup_interval_secs: float = field(default=3600.0, metadata={"check": _num(0, strict=True)})


@dataclass
class AuthConfig:
    """Who may call the router (off by default, as in fd-router)."""


@dataclass
class OutlierConfig:
    """Ejection of instances that keep failing (Envoy's outlier detection is the model)."""


@dataclass
class RouterConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    manager: ManagerConfig = field(default_factory=ManagerConfig)
    log: LogConfig = field(default_factory=LogConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    outlier: OutlierConfig = field(default_factory=OutlierConfig)
    config_path: str | None = None  # the file it was loaded from, for messages


def _section_schema(
    section: DataclassInstance | type[DataclassInstance],
) -> dict[str, Checker]:
    """YAML key → check, from the fields of a section dataclass."""
    return {f.name.replace("_", "-"): f.metadata["check"] for f in fields(section)}


#: section → YAML key → check; the sections are the dataclass-valued fields of RouterConfig.
_SCHEMA: dict[str, dict[str, Checker]] = {
    name: _section_schema(value)
    for name, value in vars(RouterConfig()).items()
    if is_dataclass(value)
}


def load_config(
    path: str | None, *, port: int | None = None, splitwise: bool = False,
    workers: int | None = None,
) -> tuple[RouterConfig, list[str]]:
    """Load and validate ``config.yaml`` (docs/fastdeploy.md#configuration), then apply the
    CLI flags.

    ``path`` None or ``""`` means defaults only. ``port`` (``--port``) overrides
    ``server.port``; ``splitwise`` (``--splitwise``) is OR-ed with ``server.splitwise``;
    ``workers`` (``--workers``) overrides ``server.workers``.
    A key whose value is YAML null counts as unset. Returns the config and the warnings
    (unknown keys); raises :class:`ConfigError` on any invalid value.
    """
    config = RouterConfig(config_path=path or None)
    warnings: list[str] = []
    if path:
        _apply(config, read_yaml_file(path), path, warnings)
        _check_consistency(config, path)
        _resolve_paths(config, path)
    if port is not None:
        if not 0 <= port <= 65535:
            raise ConfigError(f"config error: --port: must be between 0 and 65535, got {port}")
        config.server.port = port
    if workers is not None:
        if not 1 <= workers <= MAX_WORKERS:
            raise ConfigError(f"config error: --workers: must be between 1 and {MAX_WORKERS}, "
                              f"got {workers}")
        config.server.workers = workers
    if config.server.port is None:
        raise ConfigError(PORT_MISSING)
    config.server.splitwise = config.server.splitwise or splitwise
    return config, warnings


def read_yaml_file(path: str) -> object:
    """Parse a YAML file; read and syntax errors become :class:`ConfigError` naming the file."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise ConfigError(f"config error: {path}: cannot read file: {exc.strerror or exc}") from exc
    try:
        return yaml.safe_load(raw)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(
            f"config error: {path}: invalid YAML{where}: {exc.problem or exc.context}"
        ) from exc
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError(f"config error: {path}: invalid YAML: {detail}") from exc


def _error(path: str, key: str, reason: object) -> ConfigError:
    return ConfigError(f"config error: {path}: {key}: {reason}")


def _apply(config: RouterConfig, data: object, path: str, warnings: list[str]) -> None:
    """Validate the parsed YAML document and store its values into ``config``."""
    if data is None:
        return
    if not isinstance(data, dict):
        raise ConfigError(f"config error: {path}: top level must be a mapping of sections")
    for section, body in data.items():
        schema = _SCHEMA.get(str(section))
        if schema is None:
            warnings.append(f"config warning: {path}: unknown key '{section}' ignored")
            continue
        if body is None:
            continue
        if not isinstance(body, dict):
            raise _error(path, str(section), "must be a mapping")
        target = getattr(config, str(section))
        for key, value in body.items():
            dotted = f"{section}.{key}"
            check = schema.get(str(key))
            if check is None:
                warnings.append(f"config warning: {path}: unknown key '{dotted}' ignored")
            elif value is not None:
                try:
                    setattr(target, str(key).replace("-", "_"), check(value))
                except _Invalid as exc:
                    raise _error(path, dotted, exc) from None


def _check_consistency(config: RouterConfig, path: str) -> None:
    sched = config.scheduler
    if sched.metrics_scrape_timeout_secs > sched.metrics_scrape_interval_secs:
        raise _error(
            path,
            "scheduler.metrics-scrape-timeout-secs",
            f"must not exceed scheduler.metrics-scrape-interval-secs "
            f"({sched.metrics_scrape_interval_secs:g}), got {sched.metrics_scrape_timeout_secs:g}",
        )


def _resolve_paths(config: RouterConfig, path: str) -> None:
    """Resolve relative file keys against the CWD, then the config file's directory."""
    base = os.path.dirname(os.path.abspath(path))
    for section, key in (("manager", "register-path"), ("scheduler", "tokenizer-path")):
        target = getattr(config, section)
        attr = key.replace("-", "_")
        value: str = getattr(target, attr)
        if not value:
            continue
        expanded = os.path.expanduser(value)
        candidates = [os.path.abspath(expanded)]
        if not os.path.isabs(expanded):
            candidates.append(os.path.join(base, expanded))
        found = next((c for c in candidates if os.path.exists(c)), None)
        if found is None:
            raise _error(path, f"{section}.{key}", f"file not found: {value}")
        setattr(target, attr, found)
