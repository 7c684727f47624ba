"""The registration payload of an instance (docs/fastdeploy.md#registration-and-heartbeat):
model, parsing and validation.

``parse_registration`` turns a ``POST /register`` JSON payload (or a ``register.yaml`` entry)
into an immutable :class:`InstanceInfo`, or raises :class:`RegistrationError` with fd-router's
exact status and message. ``load_register_yaml`` applies it to every entry of a register.yaml
(docs/fastdeploy.md#static-instances).
"""

from __future__ import annotations

import enum
import ipaddress
import json
import re
from dataclasses import dataclass, field

from kvrouter.backends.engines import DEFAULT_ENGINE, ENGINES
from kvrouter.config import ConfigError, is_hostname, is_model_name, read_yaml_file
from kvrouter.jsondepth import check_depth


class Role(str, enum.Enum):  # noqa: UP042 - str() must stay "Role.MIXED", not "mixed"
    MIXED = "mixed"
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(frozen=True)
class InstanceInfo:
    role: Role
    host: str                      # normalised: lower-case, no scheme, no brackets, IPv6 compressed
    scheme: str                    # "http" or "https"
    port: str                      # "1".."65535"
    connector_port: str | None = None
    engine_worker_queue_port: str | None = None
    transfer_protocol: tuple[str, ...] = ()
    rdma_ports: tuple[str, ...] = ()
    device_ids: tuple[str, ...] = ()
    metrics_port: str = ""         # defaults to port
    tp_size: int | None = None     # as registered; see ``tp``
    is_paused: bool = False
    version: str | None = None
    connected_decodes: tuple = field(default=())
    bootstrap_port: str | None = None   # SGLang PD: the prefill's KV bootstrap server
    kv_zmq_address: str | None = None   # vLLM PD with P2pNcclConnector: its ZMQ host:port
    # a name in kvrouter.backends.engines.ENGINES; None: recognised from its /metrics
    engine: str | None = DEFAULT_ENGINE
    models: tuple[str, ...] = ()   # the models it serves, as registered (README "Models")

    @property
    def identity(self) -> str:
        """Normalised ``host:port`` (IPv6 bracketed)."""
        return f"{_bracket(self.host)}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{_bracket(self.host)}:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"{self.scheme}://{_bracket(self.host)}:{self.metrics_port or self.port}/metrics"

    @property
    def tp(self) -> int:
        """tp(x) (docs/fastdeploy.md#registration-payload): ``tp_size`` if given, else
        ``len(device_ids)``, else 1."""
        if self.tp_size:
            return self.tp_size
        return len(self.device_ids) or 1


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


FORMAT_ERROR = "Invalid InstanceInfo JSON format: "
FIELD_ERROR = "invalid InstanceInfo format:"  # no space after the colon (fd-router's text)
PD_ROLE_ERROR = "splitwise mode only supports PREFILL/DECODE instances"
MIXED_ROLE_ERROR = "only MIXED instances are allowed"

_ROLE_CODES = {0: Role.MIXED, 1: Role.PREFILL, 2: Role.DECODE}
_PROTOCOLS = ("ipc", "rdma")
_DIGITS_RE = re.compile(r"[0-9]+")
_SCOPE_RE = re.compile(r"[0-9A-Za-z_.-]{1,64}")   # an IPv6 zone: an interface name or index
MAX_SHOWN = 256   # characters of a refused value echoed in the reply and the log


class RegistrationError(Exception):
    """A refused registration: HTTP ``status`` and the JSON ``body`` to answer with."""

    def __init__(self, msg: str, status: int = 400) -> None:
        super().__init__(msg)
        self.msg = msg
        self.status = status
        self.body: dict[str, object] = {"code": status, "msg": msg}


class _TypeMismatch(Exception):
    """The payload cannot be decoded into the model (reported as a JSON format error)."""


@dataclass
class _Fields:
    """A payload whose JSON types are right; values are not yet validated."""

    role: Role | str | None
    host_ip: str | None
    port: int | str | None
    connector_port: int | str | None
    engine_worker_queue_port: int | str | None
    metrics_port: int | str | None
    transfer_protocol: list[str]
    rdma_ports: list[int | str]
    device_ids: list[int | str]
    tp_size: object
    is_paused: object
    version: str | None
    connected_decodes: tuple
    engine: str | None
    models: list[str]
    bootstrap_port: int | str | None = None
    kv_zmq_address: str | None = None


def parse_registration_bytes(raw: bytes, *, splitwise: bool) -> InstanceInfo:
    """Decode a ``POST /register`` body and validate it (see :func:`parse_registration`)."""
    if not raw.strip():
        raise RegistrationError(FORMAT_ERROR + "unexpected end of JSON input")
    try:
        check_depth(raw)   # the stdlib parser recurses once per level
        payload = json.loads(raw, parse_constant=_reject_constant)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise RegistrationError(FORMAT_ERROR + str(exc)) from None
    return parse_registration(payload, splitwise=splitwise)


def parse_registration(payload: object, *, splitwise: bool,
                       default_engine: str | None = DEFAULT_ENGINE) -> InstanceInfo:
    """Validate a decoded registration payload in the order of
    docs/fastdeploy.md#registration-errors.

    Type mismatches are reported first (as fd-router's JSON decode does), then field
    checks, then the mode/role check; the first failure raises :class:`RegistrationError`.
    ``default_engine`` is the engine of a payload that names none (``None``: recognise it
    from the instance's ``/metrics``).
    """
    try:
        fields = _decode(payload)
    except _TypeMismatch as exc:
        raise RegistrationError(FORMAT_ERROR + str(exc)) from None
    info = _validate(fields, splitwise, default_engine)
    if splitwise and info.role is Role.MIXED:
        raise RegistrationError(PD_ROLE_ERROR)
    if not splitwise and info.role is not Role.MIXED:
        raise RegistrationError(MIXED_ROLE_ERROR)
    return info


def load_register_yaml(path: str, *, splitwise: bool) -> list[InstanceInfo]:
    """Parse a register.yaml file (docs/fastdeploy.md#static-instances); any invalid entry is a
    :class:`ConfigError`. An entry without ``engine`` gets the one its ``/metrics`` shows
    (these instances never heartbeat, so they need not be FastDeploy)."""
    data = read_yaml_file(path)
    if data is None:
        return []
    if not isinstance(data, dict):
        raise ConfigError(f"config error: {path}: top level must be a mapping with 'instances'")
    entries = data.get("instances")
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise ConfigError(f"config error: {path}: instances: must be a list")
    instances = []
    for index, entry in enumerate(entries):
        try:
            instances.append(parse_registration(entry, splitwise=splitwise,
                                                default_engine=None))
        except RegistrationError as exc:
            raise ConfigError(f"config error: {path}: instances[{index}]: {exc.msg}") from None
    return instances


# --- phase 1: decode (JSON types) -------------------------------------------------------------


def _reject_constant(name: str) -> object:
    raise ValueError(f"invalid JSON constant {name}")


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean " + ("true" if value else "false")
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    return type(value).__name__


def _mismatch(name: str, expected: str, value: object) -> _TypeMismatch:
    return _TypeMismatch(f"{name}: expected {expected}, got {_kind(value)}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _port_like(name: str, value: object) -> int | str | None:
    """An int, a string or null; floats and bools are type errors."""
    if value is None or isinstance(value, str) or _is_int(value):
        return value  # type: ignore[return-value]  # narrowed by the checks above
    raise _mismatch(name, "an integer or a string", value)


def _string_list(name: str, value: object) -> list[str]:
    """An array of strings; null → []."""
    items = _array(name, value)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise _mismatch(f"{name}[{i}]", "a string", item)
    return items


def _id_list(name: str, value: object, *, integral_floats: bool = False) -> list[int | str]:
    """An array of integers or strings (optionally integral floats, made ints); null → []."""
    items = _array(name, value)
    for i, item in enumerate(items):
        if integral_floats and isinstance(item, float) and item.is_integer():
            items[i] = item = int(item)
        if not (isinstance(item, str) or _is_int(item)):
            raise _mismatch(f"{name}[{i}]", "an integer or a string", item)
    return items


def _array(name: str, value: object) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _mismatch(name, "an array", value)
    return list(value)


def _decode(payload: object) -> _Fields:
    """Check JSON types field by field; values are validated later, in the order of
    docs/fastdeploy.md#registration-errors."""
    if not isinstance(payload, dict):
        raise _TypeMismatch(f"expected a JSON object, got {_kind(payload)}")
    role = payload.get("role")
    if _is_int(role):
        if role not in _ROLE_CODES:
            raise _TypeMismatch(f"invalid role integer: {role}")
        role = _ROLE_CODES[role]
    elif role is not None and not isinstance(role, str):
        raise _mismatch("role", "a string or an integer", role)
    host_ip = payload.get("host_ip")
    if host_ip is not None and not isinstance(host_ip, str):
        raise _mismatch("host_ip", "a string", host_ip)
    version = payload.get("version")
    if version is not None and not isinstance(version, str):
        raise _mismatch("version", "a string", version)
    connected = payload.get("connected_decodes")
    if connected is not None and not isinstance(connected, list):
        raise _mismatch("connected_decodes", "an array", connected)
    engine = payload.get("engine")
    if engine is not None and not isinstance(engine, str):
        raise _mismatch("engine", "a string", engine)
    kv_zmq_address = payload.get("kv_zmq_address")
    if kv_zmq_address is not None and not isinstance(kv_zmq_address, str):
        raise _mismatch("kv_zmq_address", "a string", kv_zmq_address)
    return _Fields(
        role=role,
        host_ip=host_ip,
        port=_port_like("port", payload.get("port")),
        connector_port=_port_like("connector_port", payload.get("connector_port")),
        engine_worker_queue_port=_port_like(
            "engine_worker_queue_port", payload.get("engine_worker_queue_port")
        ),
        metrics_port=_port_like("metrics_port", payload.get("metrics_port")),
        transfer_protocol=_string_list("transfer_protocol", payload.get("transfer_protocol")),
        rdma_ports=_id_list("rdma_ports", payload.get("rdma_ports"), integral_floats=True),
        device_ids=_id_list("device_ids", payload.get("device_ids")),
        tp_size=payload.get("tp_size"),
        is_paused=payload.get("is_paused"),
        version=version,
        connected_decodes=tuple(connected or ()),
        engine=engine,
        models=_string_list("models", payload.get("models")),
        bootstrap_port=_port_like("bootstrap_port", payload.get("bootstrap_port")),
        kv_zmq_address=kv_zmq_address,
    )


# --- phase 2: field validation -----------------------------------------------------------------


def _show(value: object) -> str:
    """Render a value the way fd-router prints it in messages (strings unquoted, JSON otherwise).
    The message is logged too, so a string that is not printable ASCII, or is long, is shown
    clipped and escaped instead (no forged log lines)."""
    if isinstance(value, str):
        if value.isascii() and value.isprintable() and len(value) <= MAX_SHOWN:
            return value
        return ascii(value[:MAX_SHOWN])
    return json.dumps(value, separators=(",", ":"), default=str)[:MAX_SHOWN]


def _field_error(inner: str) -> RegistrationError:
    return RegistrationError(FIELD_ERROR + inner)


def _port_number(value: int | str) -> int | None:
    """The port as an int if it is a valid 1..65535 port, else None."""
    if isinstance(value, str):
        if not _DIGITS_RE.fullmatch(value):
            return None
        value = int(value)
    return value if 1 <= value <= 65535 else None


def _port_text(value: int | str) -> str:
    number = _port_number(value)
    return str(number) if number is not None else str(value)


def _optional_port(name: str, value: int | str | None, check: bool) -> str | None:
    if value is None or value == "":
        return None
    if check and _port_number(value) is None:
        raise _field_error(f"invalid {name}: {_show(value)}")
    return _port_text(value)


def normalise_host(raw: str) -> tuple[str, str] | None:
    """Split ``host_ip`` into (scheme, host) (docs/fastdeploy.md#registration-payload), or None
    if the host is invalid.

    Strips an ``http://``/``https://`` prefix, trailing ``/`` and IPv6 brackets; accepts IP
    literals (IPv6 compressed, a zone only of :data:`_SCOPE_RE`) and ASCII RFC 1123 host names;
    lower-cases the result. The host ends up in the instance URL, which the router sends in
    ``Host`` and ``X-Router-*-URL`` headers, so nothing else gets through.
    """
    text = raw.strip()
    if not text.isascii():
        return None
    scheme = "http"
    for prefix in ("http://", "https://"):
        if text[: len(prefix)].lower() == prefix:
            scheme, text = prefix[:-3], text[len(prefix):]
            break
    text = text.rstrip("/")
    bracketed = text.startswith("[") and text.endswith("]")
    if bracketed:
        text = text[1:-1]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None if bracketed or not is_hostname(text) else (scheme, text.lower())
    if bracketed and address.version != 6:
        return None
    zone = getattr(address, "scope_id", None)
    if zone is not None and not _SCOPE_RE.fullmatch(zone):
        return None
    return scheme, str(address).lower()


def _tp_size(value: object) -> int | None:
    if value is None:
        return None
    number = int(value) if isinstance(value, str) and _DIGITS_RE.fullmatch(value) else value
    if isinstance(number, int) and not isinstance(number, bool) and number >= 1:
        return number
    raise _field_error(f"invalid tp_size: {_show(value)}")


def _engine(value: str | None, default: str | None) -> str | None:
    """A name of :data:`ENGINES` (any case); absent or empty → ``default``. The value may be
    logged and listed, so a wrong one is echoed clipped and escaped."""
    if value is None or value == "":
        return default
    name = value.lower()
    if name not in ENGINES:
        raise _field_error(f"invalid engine: {value[:64]!a} "
                           f"(one of {', '.join(ENGINES)})")
    return name


MAX_MODELS = 64   # models one registration may list


def _models(names: list[str]) -> tuple[str, ...]:
    """The registered model names (:func:`kvrouter.config.is_model_name`), duplicates dropped;
    a wrong one is echoed clipped and escaped, as it may be logged."""
    if len(names) > MAX_MODELS:
        raise _field_error(f"invalid models: at most {MAX_MODELS} names")
    for i, name in enumerate(names):
        if not is_model_name(name):
            raise _field_error(f"invalid models[{i}]: {name[:64]!a} (1 to 256 characters, "
                               f"no control characters)")
    return tuple(dict.fromkeys(names))


MAX_KV_ADDRESS = 300   # characters of a kv_zmq_address (a 253-character host name and a port)


def kv_address(value: str) -> str | None:
    """``value`` as a normalised ``host:port`` (an IPv4 address, ``[IPv6]`` or an RFC 1123 host
    name, lower-cased; a 1..65535 port), or None if it is not one. vLLM's P2pNcclConnector
    reads its peer's address back out of the request id with ``(.*):(\\d+)``, and the router
    sends that id in a header, so nothing else gets through."""
    if len(value) > MAX_KV_ADDRESS or not value.isascii():
        return None
    host, sep, port = value.rpartition(":")
    number = _port_number(port) if sep else None
    if number is None:
        return None
    if host.startswith("[") and host.endswith("]"):
        try:
            return f"[{ipaddress.IPv6Address(host[1:-1]).compressed}]:{number}"
        except ValueError:
            return None
    try:
        return f"{ipaddress.IPv4Address(host)}:{number}"
    except ValueError:
        return f"{host.lower()}:{number}" if is_hostname(host) else None


def _kv_zmq_address(value: str | None) -> str | None:
    if value is None or value == "":
        return None
    address = kv_address(value)
    if address is None:
        raise _field_error(f"invalid kv_zmq_address: {_show(value)} (host:port, the host an "
                           f"IPv4 address, [IPv6] or a host name)")
    return address


def _validate(fields: _Fields, splitwise: bool,
              default_engine: str | None = DEFAULT_ENGINE) -> InstanceInfo:
    role = fields.role
    if role is None or role == "":
        raise _field_error("role is required")
    if not isinstance(role, Role):
        try:
            role = Role(role.lower())
        except ValueError:
            raise _field_error(f"invalid role: {_show(role)}") from None

    host_ip = fields.host_ip
    if not host_ip:
        raise _field_error("host_ip is required")
    parsed_host = normalise_host(host_ip)
    if parsed_host is None:
        raise _field_error(f"invalid host_ip: {_show(host_ip)}")
    scheme, host = parsed_host

    port = fields.port
    if port is None or port == "":
        raise _field_error("port is required")
    if _port_number(port) is None:
        raise _field_error(f"invalid port: {_show(port)}")
    port_text = _port_text(port)

    connector_port = _optional_port("connector_port", fields.connector_port, splitwise)
    queue_port = _optional_port(
        "engine_worker_queue_port", fields.engine_worker_queue_port, splitwise
    )

    for protocol in fields.transfer_protocol:
        if protocol not in _PROTOCOLS:
            raise _field_error(f"invalid protocol: {_show(protocol)}")

    if splitwise:
        for i, value in enumerate(fields.rdma_ports):
            if _port_number(value) is None:
                raise _field_error(f"rdma_ports[{i}] invalid port: {_show(value)}")

    metrics_port = _optional_port("metrics_port", fields.metrics_port, True) or port_text

    tp_size = _tp_size(fields.tp_size)
    is_paused = fields.is_paused if fields.is_paused is not None else False
    if not isinstance(is_paused, bool):
        raise _field_error(f"invalid is_paused: {_show(is_paused)}")
    engine = _engine(fields.engine, default_engine)
    models = _models(fields.models)
    bootstrap_port = _optional_port("bootstrap_port", fields.bootstrap_port, True)
    kv_zmq_address = _kv_zmq_address(fields.kv_zmq_address)

    return InstanceInfo(
        role=role,
        host=host,
        scheme=scheme,
        port=port_text,
        connector_port=connector_port,
        engine_worker_queue_port=queue_port,
        transfer_protocol=tuple(fields.transfer_protocol),
        rdma_ports=tuple(_port_text(v) for v in fields.rdma_ports),
        device_ids=tuple(str(v) for v in fields.device_ids),
        metrics_port=metrics_port,
        tp_size=tp_size,
        is_paused=is_paused,
        version=fields.version,
        connected_decodes=fields.connected_decodes,
        engine=engine,
        models=models,
        bootstrap_port=bootstrap_port,
        kv_zmq_address=kv_zmq_address,
    )
