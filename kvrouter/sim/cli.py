"""``kvrouter sim``: N simulated instances in one process, each heartbeating to a router.

    kvrouter sim --instances 2 --role mixed --router 127.0.0.1:9000 --preset qwen3-32b-tp2-h100

Each instance runs the engine core of :mod:`kvrouter.sim.core` with the ``--preset``
parameters; ``--block-size``, ``--num-gpu-blocks``, ``--max-num-seqs``,
``--max-num-batched-tokens`` and ``--timing`` override it. Instance ``i`` seeds its jitter
with ``--seed + i``.

``--engine vllm|sglang|llamacpp`` shows that engine's HTTP surface instead of FastDeploy's
(``/metrics`` names, health, tokenize and abort endpoints, usage in streams: see
:mod:`kvrouter.sim.instance`); such instances never register (list them in the router's
register.yaml), so ``--router`` is a usage error with them. vllm and sglang also run as
``--role prefill|decode`` with their PD hand-offs (:mod:`kvrouter.sim.pd`); an SGLang
prefill's bootstrap server listens on ``--bootstrap-port`` (+ i), and each such instance
prints its register.yaml entry (``sim register.yaml entry: {json}``) after its ready line.
``--kv-connector P2pNcclConnector`` makes vllm ones pair their legs by the peer addresses in
``X-Request-Id`` (their entry carries ``kv_zmq_address``).

``--tls-cert``/``--tls-key`` serve HTTPS (the instances register as ``https://``; their
heartbeat reads their own health in-process), ``--tls-client-ca`` requires client certificates.

Prints ``sim instance <role> <url> ready`` per instance, runs until SIGINT/SIGTERM, then
stops cleanly (exit 0). Usage errors exit 2; bind/startup errors exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Sequence

from kvrouter.sim.config import ENGINES, KV_CONNECTORS, ROLES, SimConfig
from kvrouter.sim.core.params import DEFAULT_PRESET, PRESETS, TIMING_MODELS
from kvrouter.sim.instance import SimInstance


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvrouter sim",
                                description="Run simulated inference instances "
                                            "(FastDeploy by default).",
                                epilog="Answers are 'tok0 tok1 tok2 …': one token each for the "
                                       "simulator, several for any real tokenizer, so a "
                                       "benchmark client must count tokens from the usage the "
                                       "answers report (aiperf --use-server-token-count). "
                                       "Without ignore_eos an answer stops after "
                                       "--output-tokens. See the README's 'Benchmark with "
                                       "your own client'.")
    p.add_argument("--instances", "-n", type=int, default=1, help="number of instances (default 1)")
    p.add_argument("--role", choices=ROLES, default="mixed", help="instance role (default mixed)")
    p.add_argument("--engine", choices=ENGINES, default="fastdeploy",
                   help="whose HTTP surface to show (default fastdeploy; the others never "
                        "register; llamacpp is mixed only)")
    p.add_argument("--router", default=None,
                   help="router host:port to heartbeat to (none: no registration)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--tls-cert", default=None,
                   help="serve HTTPS with this PEM certificate (with --tls-key); registers as "
                        "https://")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", default=None,
                   help="require client certificates issued by this PEM CA (mutual TLS)")
    p.add_argument("--port-base", type=int, default=0,
                   help="first API port; 0 = ephemeral (default)")
    p.add_argument("--connector-port-base", type=int, default=0,
                   help="first connector port for prefill/decode; 0 = ephemeral (default)")
    p.add_argument("--bootstrap-port", type=int, default=None,
                   help="SGLang prefill: first bootstrap port (instance i: + i); the decode "
                        "pulls the KV from it (default: ephemeral)")
    p.add_argument("--kv-connector", choices=KV_CONNECTORS, default=KV_CONNECTORS[0],
                   help="vllm prefill/decode: NixlConnector (kv_transfer_params, default) or "
                        "P2pNcclConnector (the peers' addresses in X-Request-Id)")
    p.add_argument("--metrics-port-base", type=int, default=None,
                   help="serve /metrics on separate ports from this base (0 = ephemeral); "
                        "default: API port")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="multiply all model times: 1.0 = as fast as the preset's hardware, "
                        "2 = half as fast (default 1.0)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET,
                   help=f"engine model preset (default {DEFAULT_PRESET})")
    p.add_argument("--timing", choices=TIMING_MODELS, default=None,
                   help="step-time model (default: the preset's, roofline)")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="running slots (default: preset, 256)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="token budget per engine step (default: preset, 8192)")
    p.add_argument("--max-concurrency", type=int, default=512,
                   help="requests beyond this many at once get 429, as FastDeploy's "
                        "--max-concurrency (default 512)")
    p.add_argument("--num-gpu-blocks", type=int, default=None,
                   help="KV cache blocks (default: from the preset's memory budget or "
                        "measured capacity)")
    p.add_argument("--block-size", type=int, default=None,
                   help="tokens per KV block (default: preset, 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the step-time jitter (default 0)")
    p.add_argument("--output-tokens", type=int, default=16,
                   help="natural answer length in tokens: an answer ends here (finish_reason "
                        "stop) unless max_tokens is lower; a request with ignore_eos: true "
                        "gets max_tokens instead. Raise it when a benchmark expects long "
                        "answers (default 16)")
    p.add_argument("--served-model-name", default="default",
                   help="the model name in /v1/models and answers; any name is accepted "
                        "(default 'default')")
    p.add_argument("--max-model-len", type=int, default=8192,
                   help="longest prompt + answer in tokens; longer prompts get 400 "
                        "(default 8192)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: no key)")
    p.add_argument("--version", default=None, help="model version reported at registration")
    p.add_argument("--transfer-protocol", default="ipc,rdma", help="comma list (default ipc,rdma)")
    p.add_argument("--heartbeat-period", type=float, default=5.0,
                   help="seconds between registrations with --router (default 5.0)")
    p.add_argument("--first-heartbeat-delay", type=float, default=0.0,
                   help="delay before the first registration (default 0; FastDeploy waits one "
                        "period)")
    return p


def configs_from_args(args: argparse.Namespace) -> list[SimConfig]:
    """One :class:`SimConfig` per instance (ports and jitter seeds offset by the index)."""
    if args.engine != "fastdeploy" and args.router:
        raise ValueError(f"a {args.engine} instance never registers: list it in the router's "
                         "register.yaml instead of passing --router")
    if args.bootstrap_port is not None:
        if (args.engine, args.role) != ("sglang", "prefill"):
            raise ValueError("--bootstrap-port is for --engine sglang --role prefill")
        if not 0 <= args.bootstrap_port <= 65535 - args.instances:
            raise ValueError(f"invalid --bootstrap-port: {args.bootstrap_port}")
        args.connector_port_base = args.bootstrap_port
    protocols = [x.strip() for x in args.transfer_protocol.split(",") if x.strip()]
    configs: list[SimConfig] = []
    for i in range(args.instances):
        configs.append(SimConfig(
            role=args.role, engine=args.engine, host=args.host,
            port=args.port_base + i if args.port_base else 0,
            connector_port=(args.connector_port_base + i if args.connector_port_base else
                            (None if args.role == "mixed" else 0)),
            metrics_port=(None if args.metrics_port_base is None else
                          (args.metrics_port_base + i if args.metrics_port_base else 0)),
            time_scale=args.time_scale, preset=args.preset, timing=args.timing,
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
            max_concurrency=args.max_concurrency, num_gpu_blocks=args.num_gpu_blocks,
            block_size=args.block_size, seed=args.seed + i, output_tokens=args.output_tokens,
            served_model_name=args.served_model_name, max_model_len=args.max_model_len,
            api_key=args.api_key, version=args.version, transfer_protocol=protocols,
            device_ids=[str(i)], heartbeat_period=args.heartbeat_period,
            tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
            kv_connector=args.kv_connector))
    return configs


async def _run(args: argparse.Namespace, configs: list[SimConfig]) -> int:
    instances = [SimInstance(cfg) for cfg in configs]

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover (non-Unix)
            signal.signal(sig, lambda *_: loop.call_soon_threadsafe(stop.set))
    rc = 0
    try:
        try:
            for inst in instances:
                await inst.start()
        except OSError as exc:
            print(f"sim: startup failed: {exc}", file=sys.stderr, flush=True)
            rc = 1
            return rc
        for inst in instances:
            if args.router:
                inst.start_heartbeat(args.router, period=args.heartbeat_period,
                                     first_delay=args.first_heartbeat_delay)
            print(f"sim instance {inst.config.role} {inst.url} ready", flush=True)
            if inst.config.engine != "fastdeploy" and inst.config.role != "mixed":
                entry = json.dumps(inst.register_entry(), separators=(",", ":"))
                print(f"sim register.yaml entry: {entry}", flush=True)
        await stop.wait()
    finally:
        await asyncio.gather(*(inst.stop() for inst in instances), return_exceptions=True)
    return rc


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:  # argparse: --help → 0, usage error → 2
        return int(exc.code or 0)
    if args.instances < 1:
        parser.print_usage(sys.stderr)
        print("kvrouter sim: error: --instances must be >= 1", file=sys.stderr)
        return 2
    try:
        configs = configs_from_args(args)
    except ValueError as exc:
        parser.print_usage(sys.stderr)
        print(f"kvrouter sim: error: {exc}", file=sys.stderr)
        return 2
    try:
        try:
            import uvloop
        except ImportError:
            return asyncio.run(_run(args, configs))
        return uvloop.run(_run(args, configs))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
