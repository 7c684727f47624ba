"""Configuration and fault knobs of a simulated instance (FastDeploy's HTTP surface, or the
one of another engine named by ``engine``).

:class:`SimConfig` is fixed when the instance starts (except the registration fields
``is_paused``, ``version`` and ``connected_decodes``, which are read on every heartbeat).
:class:`Knobs` is read on every request, so tests can flip faults on a live instance.

Time values in :class:`SimConfig` are *model* seconds: the simulator multiplies them by
``time_scale``. Time values in :class:`Knobs` are real (wall-clock) seconds.

The engine model is the core of :mod:`kvrouter.sim.core`: ``preset`` picks the model/GPU
parameters, and the scheduler fields below override it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from kvrouter.sim.core.params import EngineParams, make_params

ROLES = ("mixed", "prefill", "decode")
#: the engines whose HTTP surface an instance can show (kvrouter.sim.instance)
ENGINES = ("fastdeploy", "vllm", "sglang", "llamacpp")
#: the engines with a simulated PD hand-off (kvrouter.sim.pd)
PD_ENGINES = ("fastdeploy", "vllm", "sglang")
#: vLLM's KV connectors (kvrouter.sim.pd): the kv_transfer_params hand-off (NIXL), or the peer
#: addresses in the request id (P2P NCCL)
KV_CONNECTORS = ("NixlConnector", "P2pNcclConnector")


@dataclass
class SimConfig:
    # --- identity / sockets -------------------------------------------------------
    role: str = "mixed"                      # mixed | prefill | decode
    engine: str = "fastdeploy"               # whose HTTP surface: one of ENGINES
    host: str = "127.0.0.1"                  # bind address ("::1" works)
    port: int = 0                            # 0 = ephemeral (the bound port is in SimInstance.port)
    advertise_host: str | None = None        # host_ip sent to the router (default: host)
    metrics_port: int | None = None          # None: /metrics on the API port; 0: own ephemeral port
    # None = ephemeral for prefill/decode, none for mixed; 0 = ephemeral
    connector_port: int | None = None
    engine_worker_queue_port: int | None = None
    transfer_protocol: list[str] = field(default_factory=lambda: ["ipc", "rdma"])
    rdma_ports: list[int] = field(default_factory=list)
    device_ids: list[str] = field(default_factory=lambda: ["0"])
    tp_size: int = 1
    version: str | None = None
    is_paused: bool = False
    connected_decodes: list[dict[str, Any]] = field(default_factory=list)
    load_delay: float = 0.0                  # real seconds before start() binds (model "loading")
    # HTTPS on the API and metrics ports (PEM files; None: plain HTTP); tls_client_ca: require
    # a client certificate issued by it (mutual TLS)
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None

    # --- API surface ----------------------------------------------------------------
    served_model_name: str = "default"
    model_root: str | None = None            # "root" of the model card (default: served name)
    max_model_len: int = 8192
    api_key: str | None = None               # guards /v1/*: 401 {"error":"Unauthorized"}
    max_concurrency: int = 512               # in-flight inference calls before 429
    strict_model: bool = False               # True: a different "model" → 400 Unsupported model

    # --- engine model (kvrouter.sim.core) ---------------------------------------------
    preset: str = "llama3-8b-h100"           # engine preset (kvrouter.sim.core.params.PRESETS)
    # None = the preset's value; the defaults below are a small, fast instance for tests
    # (8 slots, 4096 blocks of 64 tokens instead of the preset's 256 slots, ~6,200 blocks).
    max_num_seqs: int | None = 8
    block_size: int | None = 64
    num_gpu_blocks: int | None = 4096
    max_num_batched_tokens: int | None = None   # None: preset (8192)
    timing: str | None = None                # roofline | mocker-poly | linear (None: preset's)
    jitter_sigma: float | None = None        # None: preset (0.03)
    seed: int = 0                            # seeds the step-time jitter
    engine_overrides: dict[str, Any] = field(default_factory=dict)  # any EngineParams field
    enable_prefix_caching: bool = True       # always off on decode instances
    prefix_cache_blocks: int | None = None   # cap of the cached-free LRU pool (default: no cap)
    # natural answer length ("stop"); max_tokens may cut it ("length")
    output_tokens: int = 16
    chars_per_token: int = 4                 # prompt tokenizer: one token per N characters
    # linear timing model (timing="linear"): model seconds
    ttft_base: float = 0.05
    prefill_per_token: float = 0.0002        # per uncached prompt token
    itl: float = 0.02
    time_scale: float = 0.1                  # real = model × time_scale

    # --- PD ---------------------------------------------------------------------------
    handoff_timeout: float = 30.0            # real seconds a decode waits for its hand-off
    handoff_ttl: float = 60.0                # real seconds an early hand-off stays buffered
    handoff_connect_timeout: float = 2.0     # real seconds for the prefill's POST to the connector
    kv_connector: str = "NixlConnector"      # vLLM prefill/decode: one of KV_CONNECTORS
    # KV transfer to a decode: base + prompt tokens × KV bytes per token / bandwidth (model s)
    transfer_ipc_base: float = 0.002         # model seconds (setup)
    transfer_rdma_base: float = 0.01
    transfer_ipc_bw: float = 300e9           # bytes/s intra-node (IPC/NVLink)
    transfer_rdma_bw: float = 50e9           # bytes/s, a 400 Gb/s NIC
    # set: fixed seconds per token instead of KV bytes / bw
    transfer_ipc_per_token: float | None = None
    transfer_rdma_per_token: float | None = None

    # --- registration -------------------------------------------------------------------
    heartbeat_period: float = 5.0
    health_probe_timeout: float = 3.0
    register_timeout: float = 5.0
    shutdown_timeout: float = 0.5

    def __post_init__(self) -> None:
        self.role = str(self.role).lower()
        if self.role not in ROLES:
            raise ValueError(f"invalid role {self.role!r}; expected one of {ROLES}")
        self.engine = str(self.engine).lower()
        if self.engine not in ENGINES:
            raise ValueError(f"invalid engine {self.engine!r}; expected one of {ENGINES}")
        if self.engine not in PD_ENGINES and self.role != "mixed":
            raise ValueError(f"engine {self.engine} is simulated in the mixed role only")
        if self.kv_connector not in KV_CONNECTORS:
            raise ValueError(f"invalid kv_connector {self.kv_connector!r}; expected one of "
                             f"{KV_CONNECTORS}")
        if self.kv_connector != "NixlConnector" and (self.engine != "vllm"
                                                     or self.role == "mixed"):
            raise ValueError(f"{self.kv_connector} is for vllm prefill and decode instances")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca needs tls_cert")
        if self.time_scale < 0:
            raise ValueError("time_scale must be >= 0")
        # Resolve the preset's values for the fields left to it (so they are ints afterwards).
        base = make_params(self.preset, **self._param_overrides())
        if self.max_num_seqs is None:
            self.max_num_seqs = base.max_num_seqs
        if self.block_size is None:
            self.block_size = base.block_size
        if self.num_gpu_blocks is None:
            self.num_gpu_blocks = base.total_blocks
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = base.max_num_batched_tokens
        if self.max_num_seqs < 1 or self.block_size < 1 or self.num_gpu_blocks < 1:
            raise ValueError("max_num_seqs, block_size and num_gpu_blocks must be >= 1")

    def _param_overrides(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in ("max_num_seqs", "block_size", "num_gpu_blocks", "max_num_batched_tokens",
                     "timing", "jitter_sigma"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.timing == "linear":
            out.update(linear_prefill_overhead=self.ttft_base,
                       linear_prefill_per_token=self.prefill_per_token, linear_itl=self.itl)
        out["enable_prefix_caching"] = self.enable_prefix_caching and self.role != "decode"
        if self.prefix_cache_blocks is not None:
            out["max_cached_free_blocks"] = self.prefix_cache_blocks
        out.update(self.engine_overrides)
        return out

    def engine_params(self) -> EngineParams:
        """The core's parameters: the preset with this config's fields applied."""
        return make_params(self.preset, **self._param_overrides())


@dataclass
class Knobs:
    """Fault knobs, read per request. All delays are real seconds."""

    # /health and /ping
    health_status: int = 200
    health_delay: float = 0.0
    health_body: bytes = b""
    # /metrics
    metrics_override: dict[str, float | str | None] = field(default_factory=dict)
    metrics_delay: float = 0.0
    metrics_status: int = 200
    # inference (/v1/chat/completions, /v1/completions)
    # force this status with reply_body (JSON-encoded if not bytes/str)
    reply_status: int | None = None
    reply_body: Any = None
    header_delay: float = 0.0                # before anything is sent
    first_byte_delay: float = 0.0            # headers sent at once, body delayed
    reset_before_response: bool = False      # RST the connection without answering
    # stream: N events then RST; non-stream: half the body then RST
    drop_after_events: int | None = None
    # pause between the last event and the RST (lets the client read)
    drop_delay: float = 0.05
    sse_script: list[bytes] | None = None    # stream these bytes verbatim (200, text/event-stream)
    sse_script_delay: float = 0.0            # pause between script items
    pd_reschedule_on: set[int] = field(default_factory=set)  # 1-based inference ordinals
    pd_reschedule_after: int = 2             # tokens generated before the pd_reschedule finish
    # non-stream bodies also carry {"echo":{"body","headers"}}
    echo: bool = False
    ttft: float | None = None                # override the modelled prefill time
    itl: float | None = None                 # override the modelled inter-token latency
    handoff_timeout: float | None = None     # override SimConfig.handoff_timeout
    post_handoff_delay: float = 0.0          # prefill: pause after the hand-off, before replying


def knobs_to_json(knobs: Knobs) -> dict[str, Any]:
    """The knobs as JSON-able values (bytes as text, sets as sorted lists)."""
    out: dict[str, Any] = {}
    for f in fields(Knobs):
        value = getattr(knobs, f.name)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        elif isinstance(value, set):
            value = sorted(value)
        elif isinstance(value, list) and value and isinstance(value[0], bytes):
            value = [v.decode("utf-8", "replace") for v in value]
        out[f.name] = value
    return out


def update_knobs(knobs: Knobs, changes: dict[str, Any]) -> None:
    """Apply a JSON object of knob changes (the inverse of :func:`knobs_to_json`); an unknown
    name raises ``KeyError`` and nothing is changed."""
    names = {f.name for f in fields(Knobs)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise KeyError(", ".join(unknown))
    for name, value in changes.items():
        current = getattr(knobs, name)
        if isinstance(current, bytes) and isinstance(value, str):
            value = value.encode()
        elif isinstance(current, set):
            value = set(value or ())
        elif name == "sse_script" and value is not None:
            value = [v.encode() if isinstance(v, str) else v for v in value]
        setattr(knobs, name, value)
