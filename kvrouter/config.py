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
import reprlib
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


_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxdict, _SHOWN.maxstring = 2, 6, 6, 100


def _show(value: object) -> str:
    """A value for a message; lists and mappings abridged (YAML aliases can make a short file
    denote a structure far too large to print)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (list, dict)):
        return _SHOWN.repr(value)
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


def _tokenizer_engine(value: object) -> str:
    """An engine with a tokenize endpoint (``kvrouter.backends.engines``), any case."""
    from kvrouter.backends.engines import ENGINES

    names = [name for name, engine in ENGINES.items() if engine.tokenize is not None]
    return str(_choice(*names, fold=True)(value))


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
    """An http(s) URL with a host; a missing scheme means ``http://``
    (docs/fastdeploy.md#cache-aware-routing). The reason never shows a password."""
    url = _text(value)
    if url:
        shown = _show(redact_url(url))
        try:
            parts = urlsplit(url if "://" in url else "http://" + url)
            port = parts.port
        except ValueError as exc:       # unbalanced brackets, a port out of range or not a number
            raise _Invalid(f"invalid URL {shown}: {exc}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise _Invalid(f"must be an http:// or https:// URL, got {shown}")
        if port == 0:
            raise _Invalid(f"port must be between 1 and 65535, got {shown}")
    return url


MAX_KEYS = 1024      # bounds memory: keys are looked up by digest (auth.py), per source
MAX_CIDRS = 256
SECRET_RE = re.compile(r"[\x21-\x7e]{1,512}")


def _secret(value: object) -> str:
    """A key or token: 1..512 visible ASCII characters. The reason never shows the value."""
    if not isinstance(value, str):
        raise _Invalid("must be a string")
    if value and not SECRET_RE.fullmatch(value):
        raise _Invalid("must be 1 to 512 visible ASCII characters (no spaces)")
    return value


def _secrets(value: object) -> list[str]:
    """A list of keys (:func:`_secret`, none empty), at most :data:`MAX_KEYS`."""
    if not isinstance(value, list):
        raise _Invalid("must be a list of strings")
    if len(value) > MAX_KEYS:
        raise _Invalid(f"at most {MAX_KEYS} keys")
    for i, item in enumerate(value, 1):
        try:
            if not _secret(item):
                raise _Invalid("must not be empty")
        except _Invalid as exc:
            raise _Invalid(f"item {i} {exc}") from None
    return list(value)


def _cidrs(value: object) -> list[str]:
    """A list of IPv4/IPv6 networks (``10.0.0.0/8``; a bare address is a /32 or /128)."""
    if not isinstance(value, list):
        raise _Invalid("must be a list of CIDR strings")
    if len(value) > MAX_CIDRS:
        raise _Invalid(f"at most {MAX_CIDRS} networks")
    out = []
    for item in value:
        try:
            out.append(str(ipaddress.ip_network(_text(item))))
        except ValueError as exc:
            raise _Invalid(f"invalid network {_show(item)}: {exc}") from None
    return out


MAX_ALIASES = 1024
MAX_MODEL_NAME = 256
_MODEL_NAME_RE = re.compile(rf"[^\x00-\x1f\x7f]{{1,{MAX_MODEL_NAME}}}")


def is_model_name(name: object) -> bool:
    """A model name: a string of 1..256 characters without control characters (alias keys and
    targets, the ``models`` of a registration)."""
    return isinstance(name, str) and _MODEL_NAME_RE.fullmatch(name) is not None


def _aliases(value: object) -> dict[str, str]:
    """A mapping alias → model name (each 1..256 characters, no control characters), at most
    :data:`MAX_ALIASES`; an alias never maps to another alias (one lookup resolves it)."""
    if not isinstance(value, dict):
        raise _Invalid(f"must be a mapping of alias: model name, got {_show(value)}")
    if len(value) > MAX_ALIASES:
        raise _Invalid(f"at most {MAX_ALIASES} aliases")
    for alias, model in value.items():
        for what, name in (("alias", alias), (f"alias {_show(alias)}: model", model)):
            if not is_model_name(name):
                raise _Invalid(f"{what} must be a string of 1 to {MAX_MODEL_NAME} characters "
                               f"without control characters, got {_show(name)}")
        if model in value:
            raise _Invalid(f"alias {_show(alias)} maps to {_show(model)}, which is an alias too")
    return dict(value)


MAX_REDIS_URL = 2048
_KEY_PREFIX_RE = re.compile(r"[A-Za-z0-9_.:{}-]{1,64}")


def redact_url(url: str) -> str:
    """``url`` with its password shown as ``***`` (for messages and logs). Split by hand, as
    ``urlsplit`` does, because it must also work on the URLs ``urlsplit`` refuses (unbalanced
    ``[``), which are the ones an error message shows; a URL without ``scheme://`` is read as
    ``[user[:password]@]host…``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    end = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
    userinfo, at, hostport = rest[:end].rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}{sep}{userinfo.partition(':')[0]}:***@{hostport}{rest[end:]}"


def _redis_url(value: object) -> str:
    """``redis://[[user]:password@]host[:port][/db]`` or ``rediss://`` (TLS); "" = off. The
    reason never shows the password."""
    if not isinstance(value, str):
        raise _Invalid("must be a string")
    if not value:
        return value
    shown = redact_url(value) if len(value) <= MAX_REDIS_URL else "(too long)"
    if len(value) > MAX_REDIS_URL or any(c.isspace() or ord(c) < 0x20 for c in value):
        raise _Invalid(f"must be a redis:// or rediss:// URL, got {shown}")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise _Invalid(f"invalid URL {shown}: {exc}") from None
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise _Invalid(f"must be a redis:// or rediss:// URL with a host, got {shown}")
    if port == 0:
        raise _Invalid(f"port must be between 1 and 65535, got {shown}")
    if parts.path not in ("", "/") and not re.fullmatch(r"/[0-9]{1,5}", parts.path):
        raise _Invalid(f"the path must be a database number (/0), got {shown}")
    return value


def _key_prefix(value: object) -> str:
    """What every Redis key of the shared state starts with (replica groups sharing one Redis
    use different ones): 1..64 of ``A-Z a-z 0-9 _ . : { } -``."""
    text = _text(value)
    if not _KEY_PREFIX_RE.fullmatch(text):
        raise _Invalid(f"must be 1 to 64 of A-Z a-z 0-9 _ . : {{ }} -, got {_show(value)}")
    return text


_SERVICE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}")


def _tracing_enabled(value: object) -> bool:
    """A boolean; ``true`` needs the ``otel`` extra installed (checked, not imported)."""
    import importlib.util

    from kvrouter.tracing import OTEL_MODULES

    enabled = _bool(value)
    if enabled:
        for module in OTEL_MODULES:
            try:
                found = importlib.util.find_spec(module) is not None
            except ModuleNotFoundError:
                found = False
            if not found:
                raise _Invalid(f"needs OpenTelemetry ({module} is not installed): "
                               "pip install 'kvrouter[otel]'")
    return enabled


def _service_name(value: object) -> str:
    """An OpenTelemetry ``service.name``: 1..128 of ``A-Z a-z 0-9 _ . : / -``."""
    text = _text(value)
    if not _SERVICE_NAME_RE.fullmatch(text):
        raise _Invalid(f"must be 1 to 128 of A-Z a-z 0-9 _ . : / - (starting with a letter "
                       f"or digit), got {_show(value)}")
    return text


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
    status_retries: int = field(default=1, metadata={"check": _int(0)})
    retry_budget_percent: float = field(default=20.0, metadata={"check": _num(0, 100)})
    max_body_mb: float = field(default=100.0, metadata={"check": _num(0, strict=True)})
    disaggregate_info_format: str = field(
        default="flat", metadata={"check": _choice("flat", "nested")})
    # worker processes (kvrouter.workers); 1 = one process
    workers: int = field(default=1, metadata={"check": _int(1, MAX_WORKERS)})
    # client connections (kvrouter.http.server.Limits): what one client may send or hold
    max_url_bytes: int = field(default=8 << 10, metadata={"check": _int(256, 1 << 20)})
    max_header_bytes: int = field(default=32 << 10, metadata={"check": _int(1 << 10, 1 << 22)})
    max_headers: int = field(default=100, metadata={"check": _int(8, 10_000)})
    header_timeout_secs: float = field(default=20.0, metadata={"check": _num(0, strict=True)})
    keepalive_timeout_secs: float = field(default=75.0, metadata={"check": _num(0, strict=True)})
    max_connections: int = field(default=10_000, metadata={"check": _int(1)})
    # SIGTERM: in-flight requests finish within this, then the rest are cut (0 = at once)
    shutdown_grace_secs: float = field(default=30.0, metadata={"check": _num(0)})
    # HTTPS on the listening sockets (kvrouter.http.tls): both or neither, PEM files
    tls_cert_path: str = field(default="", metadata={"check": _text})
    tls_key_path: str = field(default="", metadata={"check": _text})


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
    # how tokenizer-url is called: that engine's tokenize endpoint (backends.engines)
    tokenizer_engine: str = field(default="fastdeploy", metadata={"check": _tokenizer_engine})
    stats_interval_secs: float = field(default=5.0, metadata={"check": _num(0)})
    pd_retry_count: int = field(default=3, metadata={"check": _int(0)})
    pd_retry_exclude_decode: bool = field(default=True, metadata={"check": _bool})
    # the admission queue (kvrouter.admission): limits per instance, 0 = none
    max_inflight_per_instance: int = field(default=0, metadata={"check": _int(0)})
    max_queued_prefill_tokens_per_instance: int = field(default=0, metadata={"check": _int(0)})
    queue_size: int = field(default=1024, metadata={"check": _int(0)})
    queue_timeout_secs: float = field(default=30.0, metadata={"check": _num(0, strict=True)})
    metrics_scrape_interval_secs: float = field(
        default=2.0, metadata={"check": _num(0, strict=True)})
    metrics_scrape_timeout_secs: float = field(
        default=1.0, metadata={"check": _num(0, strict=True)})
    cache_max_blocks: int = field(default=200_000, metadata={"check": _int(1)})
    # alias → model name (Router.select); README "Models"
    model_aliases: dict[str, str] = field(default_factory=dict, metadata={"check": _aliases})
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
    # https:// instances (kvrouter.http.tls): CA bundle (default: the system CAs), and the
    # client certificate presented to them (mutual TLS; both or neither), PEM files
    tls_ca: str = field(default="", metadata={"check": _text})
    tls_client_cert: str = field(default="", metadata={"check": _text})
    tls_client_key: str = field(default="", metadata={"check": _text})


@dataclass
class LogConfig:
    level: str = field(default="info", metadata={"check": _choice(*LOG_LEVELS, fold=True)})
    output: str = field(default="stdout", metadata={"check": _choice("stdout", "file")})
    max_age_days: float = field(default=7.0, metadata={"check": _num(0)})
    max_total_size_mb: float = field(default=500.0, metadata={"check": _num(0)})
    cleanup_interval_secs: float = field(default=3600.0, metadata={"check": _num(0, strict=True)})
    # text: "<date> <time>.<ms> LEVEL logger: message"; json: one JSON object per line
    format: str = field(default="text", metadata={"check": _choice("text", "json")})


@dataclass
class TracingConfig:
    """OpenTelemetry tracing of inference requests (``pip install kvrouter[otel]``;
    :mod:`kvrouter.tracing`). Off by default: then nothing of OpenTelemetry is imported."""

    enabled: bool = field(default=False, metadata={"check": _tracing_enabled})
    # OTLP over HTTP/protobuf; "" = OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT or localhost:4318
    endpoint: str = field(default="", metadata={"check": _url})
    service_name: str = field(default="kvrouter", metadata={"check": _service_name})
    # share of new traces recorded; a request carrying a traceparent follows its sampled flag
    sample_ratio: float = field(default=1.0, metadata={"check": _num(0, 1)})


@dataclass
class AuthConfig:
    """Who may call the router (off by default, as in fd-router; README "Authentication").
    The secrets are left out of ``repr``, so a logged config never shows them."""

    api_keys: list[str] = field(default_factory=list, repr=False,
                                metadata={"check": _secrets})
    api_keys_file: str = field(default="", metadata={"check": _text})
    admin_token: str = field(default="", repr=False, metadata={"check": _secret})
    register_allow_cidrs: list[str] = field(default_factory=list, metadata={"check": _cidrs})
    register_source_must_match: bool = field(default=True, metadata={"check": _bool})
    forward_client_key: bool = field(default=False, metadata={"check": _bool})


@dataclass
class OutlierConfig:
    """Ejection of instances that keep failing (Envoy's outlier detection is the model;
    :mod:`kvrouter.control.outlier`). On by default: it only ever leaves out an instance whose
    answers are mostly failures, for a bounded time, and never more than
    ``max-ejection-percent`` of a role. ``0`` turns a detection rule off."""

    enabled: bool = field(default=True, metadata={"check": _bool})
    consecutive_failures: int = field(default=5, metadata={"check": _int(0)})
    failure_rate_percent: float = field(default=50.0, metadata={"check": _num(0, 100)})
    min_requests: int = field(default=20, metadata={"check": _int(1)})
    interval_secs: float = field(default=10.0, metadata={"check": _num(0, strict=True)})
    base_ejection_secs: float = field(default=30.0, metadata={"check": _num(0, strict=True)})
    max_ejection_secs: float = field(default=300.0, metadata={"check": _num(0, strict=True)})
    max_ejection_percent: float = field(default=50.0, metadata={"check": _num(0, 100)})
    consecutive_successes: int = field(default=10, metadata={"check": _int(1)})


@dataclass
class StateConfig:
    """Routing state shared by router replicas through Redis (README "Router replicas
    (Redis)", :mod:`kvrouter.shared.redis`). The URL stays out of ``repr``: it may hold a
    password."""

    redis_url: str = field(default="", repr=False, metadata={"check": _redis_url})
    # Redis unreachable at startup: start on local state and keep reconnecting (else exit 1)
    redis_optional: bool = field(default=False, metadata={"check": _bool})
    key_prefix: str = field(default="kvrouter", metadata={"check": _key_prefix})
    # connect and command timeout; a Redis slower than this counts as lost
    redis_timeout_secs: float = field(default=2.0, metadata={"check": _num(0.1, 60)})
    # registrations kept in Redis this long after the last heartbeat or leader refresh
    registry_ttl_secs: float = field(default=60.0, metadata={"check": _num(5, 86400)})
    # the health-round lease: renewed every third of it; a killed leader is replaced after it
    leader_ttl_secs: float = field(default=3.0, metadata={"check": _num(0.5, 60)})
    # each replica stores its in-flight counters in its load key and reads the others' this
    # often (changes also travel on the event stream at once); a killed replica's counters
    # stop counting after load-ttl-secs
    load_interval_secs: float = field(default=0.25, metadata={"check": _num(0.01, 10)})
    load_ttl_secs: float = field(default=2.0, metadata={"check": _num(0.1, 600)})
    # recent batches of prefix records kept in Redis for a replica that starts (0 = none)
    prefix_history: int = field(default=10_000, metadata={"check": _int(0, 1_000_000)})


@dataclass
class RouterConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    manager: ManagerConfig = field(default_factory=ManagerConfig)
    log: LogConfig = field(default_factory=LogConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    outlier: OutlierConfig = field(default_factory=OutlierConfig)
    state: StateConfig = field(default_factory=StateConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
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
    workers: int | None = None, redis_url: str | None = None,
) -> tuple[RouterConfig, list[str]]:
    """Load and validate ``config.yaml`` (docs/fastdeploy.md#configuration), then apply the
    CLI flags.

    ``path`` None or ``""`` means defaults only. ``port`` (``--port``) overrides
    ``server.port``; ``splitwise`` (``--splitwise``) is OR-ed with ``server.splitwise``;
    ``workers`` (``--workers``) overrides ``server.workers``; ``redis_url`` (``--redis-url``)
    overrides ``state.redis-url``.
    A key whose value is YAML null counts as unset. Returns the config and the warnings
    (unknown keys); raises :class:`ConfigError` on any invalid value.
    """
    config = RouterConfig(config_path=path or None)
    warnings: list[str] = []
    if path:
        _apply(config, read_yaml_file(path), path, warnings)
        _check_consistency(config, path)
        _resolve_paths(config, path)
        _check_keys_file(config.auth, path)
    _auth_from_env(config.auth)
    if port is not None:
        if not 0 <= port <= 65535:
            raise ConfigError(f"config error: --port: must be between 0 and 65535, got {port}")
        config.server.port = port
    if workers is not None:
        if not 1 <= workers <= MAX_WORKERS:
            raise ConfigError(f"config error: --workers: must be between 1 and {MAX_WORKERS}, "
                              f"got {workers}")
        config.server.workers = workers
    if redis_url is not None:
        try:
            config.state.redis_url = _redis_url(redis_url)
        except _Invalid as exc:
            raise ConfigError(f"config error: --redis-url: {exc}") from None
    if config.state.redis_url and config.server.workers > 1:
        # each replica is one process: its worker siblings would share state twice over
        raise _error(path or "--redis-url", "state.redis-url",
                     f"cannot be combined with server.workers > 1 (got "
                     f"{config.server.workers}): run one router process per replica")
    if config.server.port is None:
        raise ConfigError(PORT_MISSING)
    config.server.splitwise = config.server.splitwise or splitwise
    return config, warnings


MAX_YAML_BYTES = 4 << 20     # config.yaml, register.yaml: parsed in memory


def read_yaml_file(path: str) -> object:
    """Parse a YAML file; read and syntax errors become :class:`ConfigError` naming the file,
    and so does whatever else a hostile file makes the parser raise: a ``RecursionError``
    (deep nesting), a ``ValueError`` (a date such as ``2020-13-45``), …"""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_YAML_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"config error: {path}: cannot read file: {exc.strerror or exc}") from exc
    if len(raw) > MAX_YAML_BYTES:
        raise ConfigError(f"config error: {path}: larger than {MAX_YAML_BYTES >> 20} MiB")
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
    except RecursionError:
        raise ConfigError(f"config error: {path}: invalid YAML: nested too deeply") from None
    except Exception as exc:  # a scalar PyYAML's constructors refuse with a non-YAML error
        detail = " ".join(str(exc).split())[:200]
        raise ConfigError(f"config error: {path}: invalid YAML: {detail}") from None


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
    state = config.state
    if state.load_ttl_secs < 3 * state.load_interval_secs:
        raise _error(path, "state.load-ttl-secs",
                     f"must be at least 3 × state.load-interval-secs "
                     f"({3 * state.load_interval_secs:g}), got {state.load_ttl_secs:g}")


#: file keys that come in pairs (both or neither), and every TLS file key
TLS_PAIRS = (("server", "tls-cert-path", "tls-key-path"),
             ("manager", "tls-client-cert", "tls-client-key"))
TLS_FILES = (*((sec, key) for sec, a, b in TLS_PAIRS for key in (a, b)), ("manager", "tls-ca"))


def _resolve_paths(config: RouterConfig, path: str) -> None:
    """Resolve relative file keys against the CWD, then the config file's directory. The TLS
    files come in pairs and must load (kvrouter.http.tls.check), or startup stops."""
    base = os.path.dirname(os.path.abspath(path))
    for section, key in (("manager", "register-path"), ("scheduler", "tokenizer-path"),
                         ("auth", "api-keys-file"), *TLS_FILES):
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
    for section, first, second in TLS_PAIRS:
        target = getattr(config, section)
        given = [k for k in (first, second) if getattr(target, k.replace("-", "_"))]
        if len(given) == 1:
            missing = second if given[0] == first else first
            raise _error(path, f"{section}.{missing}", f"required with {section}.{given[0]}")
    # imported here: kvrouter.http.tls depends on this module (RouterConfig, ConfigError)
    from kvrouter.http.tls import check

    check(config)


ENV_API_KEYS = "KVROUTER_API_KEYS"
ENV_ADMIN_TOKEN = "KVROUTER_ADMIN_TOKEN"


def _auth_from_env(auth: AuthConfig) -> None:
    """Secrets from the environment, so they need not sit in a config file:
    ``KVROUTER_API_KEYS`` (comma-separated) are added to ``auth.api-keys``,
    ``KVROUTER_ADMIN_TOKEN`` replaces ``auth.admin-token``. Errors never show a value."""
    keys = [k.strip() for k in os.environ.get(ENV_API_KEYS, "").split(",") if k.strip()]
    token = os.environ.get(ENV_ADMIN_TOKEN, "").strip()
    try:
        if keys:
            _secrets(keys)                      # an item number counts in the variable
            auth.api_keys = _secrets(auth.api_keys + keys)
    except _Invalid as exc:
        raise _error("$" + ENV_API_KEYS, "auth.api-keys", exc) from None
    try:
        if token:
            auth.admin_token = _secret(token)
    except _Invalid as exc:
        raise _error("$" + ENV_ADMIN_TOKEN, "auth.admin-token", exc) from None


def _check_keys_file(auth: AuthConfig, path: str) -> None:
    """Read ``auth.api-keys-file`` once at startup, so a broken one stops the start (later
    changes are re-read by kvrouter.server.auth, which keeps the previous keys on an error)."""
    if not auth.api_keys_file:
        return
    # imported here: kvrouter.server.auth depends on this module (AuthConfig)
    from kvrouter.server.auth import KeysFileError, read_keys_file

    try:
        read_keys_file(auth.api_keys_file)
    except KeysFileError as exc:
        raise _error(path, "auth.api-keys-file", exc) from None
