"""Router configuration: the schema of ``config.yaml`` (fd-router keys plus kvrouter's own).

Field names are the YAML keys with ``-`` replaced by ``_``. Defaults are fd-router's
(contract §2.3) and kvrouter's (§2.4). :func:`load_config` reads and validates a file
against this schema (§2.2).
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import yaml


@dataclass
class ServerConfig:
    port: int | None = None
    host: str = "0.0.0.0"
    mode: str = "release"
    splitwise: bool = False
    name: str = ""
    connect_timeout_secs: float = 5.0
    first_byte_timeout_secs: float = 600.0
    stream_idle_timeout_secs: float = 300.0
    connect_retries: int = 2
    max_body_mb: float = 100.0
    disaggregate_info_format: str = "flat"
    workers: int = 1               # worker processes (kvrouter.workers); 1 = one process


@dataclass
class SchedulerConfig:
    policy: str = "request_num"
    prefill_policy: str = "process_tokens"
    decode_policy: str = "request_num"
    eviction_interval_secs: float = 60.0
    eviction_duration_mins: float = 30.0
    cache_block_size: int = 64
    tokenizer_url: str = ""
    tokenizer_timeout_secs: float = 2.0
    tokenizer_path: str = ""
    balance_abs_threshold: float = 1.0
    balance_rel_threshold: float = 0.2
    hit_ratio_weight: float = 1.0
    load_balance_weight: float = 1.0
    waiting_weight: float = 1.0
    stats_interval_secs: float = 5.0
    pd_retry_count: int = 3
    pd_retry_exclude_decode: bool = True
    metrics_scrape_interval_secs: float = 2.0
    metrics_scrape_timeout_secs: float = 1.0
    cache_max_blocks: int = 200_000
    # sglang_cache_aware (SGLang router defaults)
    sglang_cache_threshold: float = 0.3
    sglang_balance_abs_threshold: float = 64.0
    sglang_balance_rel_threshold: float = 1.5
    sglang_miss_policy: str = "min_load"
    # kv_cost
    kv_cost_prefill_tokens_per_sec: float = 12000.0
    kv_cost_decode_weight: float = 0.002
    kv_cost_exploration: float = 0.01
    kv_cost_miss_weight: float = 2.0
    kv_cost_itl_weight: float = 0.1
    kv_cost_transfer_tokens_per_sec: float = 190000.0
    kv_cost_chars_per_token: float = 4.0


@dataclass
class ManagerConfig:
    register_path: str = ""
    health_failure_threshold: int = 1
    health_success_threshold: int = 1
    health_check_timeout_secs: float = 5.0
    health_check_interval_secs: float = 5.0
    health_check_endpoint: str = "/health"
    unhealthy_removal_secs: float = 300.0
    models_refresh_secs: float = 60.0


@dataclass
class LogConfig:
    level: str = "info"
    output: str = "stdout"
    max_age_days: float = 7.0
    max_total_size_mb: float = 500.0
    cleanup_interval_secs: float = 3600.0


@dataclass
class RouterConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    manager: ManagerConfig = field(default_factory=ManagerConfig)
    log: LogConfig = field(default_factory=LogConfig)
    config_path: str | None = None  # the file it was loaded from, for messages


#: Every valid policy name: the contract's (§6.2) in its order, then kvrouter's own. The
#: policies package builds one class per name (checked by its tests).
POLICY_NAMES: tuple[str, ...] = (
    "random",
    "round_robin",
    "power_of_two",
    "process_tokens",
    "request_num",
    "fd_metrics_score",
    "fd_remote_metrics_score",
    "cache_aware",
    "remote_cache_aware",
    "sglang_cache_aware",
    "kv_cost",
)
LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warn", "error")

MAX_WORKERS = 64
PORT_MISSING = "Failed to load config: failed to set router listen port"


class ConfigError(Exception):
    """A configuration problem that prevents startup; ``str(err)`` is the message to print."""


def load_config(
    path: str | None, *, port: int | None = None, splitwise: bool = False,
    workers: int | None = None,
) -> tuple[RouterConfig, list[str]]:
    """Load and validate ``config.yaml`` (contract §2.2–2.4), then apply the CLI flags.

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
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
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
    name = _text(value)
    if name not in POLICY_NAMES:
        raise _Invalid(f"unknown policy '{name}' (valid: {', '.join(POLICY_NAMES)})")
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
    """An http(s) URL; a missing scheme means ``http://`` (contract §6.4)."""
    url = _text(value)
    if url:
        parts = urlsplit(url if "://" in url else "http://" + url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise _Invalid(f"must be an http:// or https:// URL, got {_show(value)}")
    return url


_SCHEMA: dict[str, dict[str, Checker]] = {
    "server": {
        "port": _int(0, 65535),
        "host": _bind_host,
        "mode": _choice("debug", "release", "test"),
        "splitwise": _bool,
        "name": _label,
        "connect-timeout-secs": _num(0),
        "first-byte-timeout-secs": _num(0),
        "stream-idle-timeout-secs": _num(0),
        "connect-retries": _int(0),
        "max-body-mb": _num(0, strict=True),
        "disaggregate-info-format": _choice("flat", "nested"),
        "workers": _int(1, MAX_WORKERS),
    },
    "scheduler": {
        "policy": _policy,
        "prefill-policy": _policy,
        "decode-policy": _policy,
        "eviction-interval-secs": _num(0),
        "eviction-duration-mins": _num(0),
        "cache-block-size": _int(1),
        "tokenizer-url": _url,
        "tokenizer-timeout-secs": _num(0, strict=True),
        "tokenizer-path": _text,
        "balance-abs-threshold": _num(0),
        "balance-rel-threshold": _num(0, 1),
        "hit-ratio-weight": _num(0),
        "load-balance-weight": _num(0),
        "waiting-weight": _num(0),
        "stats-interval-secs": _num(0),
        "pd-retry-count": _int(0),
        "pd-retry-exclude-decode": _bool,
        "metrics-scrape-interval-secs": _num(0, strict=True),
        "metrics-scrape-timeout-secs": _num(0, strict=True),
        "cache-max-blocks": _int(1),
        "sglang-cache-threshold": _num(0, 1),
        "sglang-balance-abs-threshold": _num(0),
        "sglang-balance-rel-threshold": _num(0),
        "sglang-miss-policy": _choice("min_load", "smallest_tree"),
        "kv-cost-prefill-tokens-per-sec": _num(0, strict=True),
        "kv-cost-decode-weight": _num(0),
        "kv-cost-exploration": _num(0, 1),
        "kv-cost-miss-weight": _num(0),
        "kv-cost-itl-weight": _num(0),
        "kv-cost-transfer-tokens-per-sec": _num(0),
        "kv-cost-chars-per-token": _num(0, strict=True),
    },
    "manager": {
        "register-path": _text,
        "health-failure-threshold": _int(1),
        "health-success-threshold": _int(1),
        "health-check-timeout-secs": _num(0, strict=True),
        "health-check-interval-secs": _num(0, strict=True),
        "health-check-endpoint": _endpoint,
        "unhealthy-removal-secs": _num(0),
        "models-refresh-secs": _num(0, strict=True),
    },
    "log": {
        "level": _choice(*LOG_LEVELS, fold=True),
        "output": _choice("stdout", "file"),
        "max-age-days": _num(0),
        "max-total-size-mb": _num(0),
        "cleanup-interval-secs": _num(0, strict=True),
    },
}


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
