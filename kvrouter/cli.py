"""Command line (docs/fastdeploy.md#command-line): ``kvrouter [--port P] [--splitwise]
[--config_path F] [--workers N] [--redis-url URL] [-V]``.

Also dispatches subcommands (``kvrouter sim …``). Exit status: 0 ok, 1 config/startup error,
2 usage error.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import platform
import sys

from kvrouter import __version__
from kvrouter.config import PORT_MISSING, ConfigError, load_config
from kvrouter.instance import load_register_yaml
from kvrouter.logsetup import setup_logging

SUBCOMMANDS: dict[str, str] = {"sim": "kvrouter.sim.cli:main", "demo": "kvrouter.demo:main",
                               "bench": "kvrouter.bench:main"}
"""Subcommand name → ``"module:function"``; the function gets the remaining argv."""

_LONG_FLAGS = ("port", "splitwise", "config_path", "workers", "version")

log = logging.getLogger("kvrouter.cli")


def main(argv: list[str] | None = None) -> int:
    """Run the router (or a subcommand) and return the process exit status."""
    args_list = sys.argv[1:] if argv is None else list(argv)
    if args_list and args_list[0] in SUBCOMMANDS:
        module_name, _, func_name = SUBCOMMANDS[args_list[0]].partition(":")
        command = getattr(importlib.import_module(module_name), func_name)
        return int(command(args_list[1:]) or 0)

    try:
        args = _parser().parse_args(_normalise(args_list))
    except SystemExit as exc:  # usage error (2) or --help (0)
        return exc.code if isinstance(exc.code, int) else 2
    if args.version:
        print(f"kvrouter {__version__}")
        impl = platform.python_implementation()
        print(f"python {platform.python_version()} ({impl}, {sys.platform})")
        return 0

    try:
        config, warnings = load_config(args.config_path, port=args.port, splitwise=args.splitwise,
                                       workers=args.workers, redis_url=args.redis_url)
        for warning in warnings:
            print(warning, file=sys.stderr)
        static = (load_register_yaml(config.manager.register_path,  # before serving
                                     splitwise=config.server.splitwise)
                  if config.manager.register_path else [])
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        if str(exc) == PORT_MISSING:    # fd-router's words, then how to set it
            print("kvrouter: set the listen port with --port P (0: any free port) or "
                  "server.port in the file given to --config_path", file=sys.stderr)
        return 1

    setup_logging(config.log)
    for warning in warnings:
        log.warning(warning)

    if config.server.workers > 1:
        from kvrouter.workers.supervisor import supervise

        return supervise(config, static)
    from kvrouter.server.app import serve

    return serve(config, static)


def _normalise(argv: list[str]) -> list[str]:
    """Turn fd-router's single-dash long flags (``-port 9000``, ``-port=9000``) into ``--port``."""
    out = []
    for arg in argv:
        name = arg[1:].split("=", 1)[0]
        if arg.startswith("-") and not arg.startswith("--") and name in _LONG_FLAGS:
            arg = "-" + arg
        out.append(arg)
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvrouter",
        description="Cache-aware, load-aware LLM request router (FastDeploy fd-router compatible).",
        epilog="subcommands: " + ", ".join(SUBCOMMANDS) + " (run 'kvrouter <subcommand> --help')",
        allow_abbrev=False,
    )
    parser.add_argument("--port", type=int, metavar="P",
                        help="listen port, 0 = any free one; overrides server.port (one of the "
                             "two is required)")
    parser.add_argument("--splitwise", action="store_true", help="PD (prefill/decode) mode")
    parser.add_argument("--config_path", default="", metavar="F",
                        help="YAML config file (default: none, every key at its default)")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="worker processes sharing the port and the routing state; "
                             "overrides server.workers (default 1)")
    parser.add_argument("--redis-url", metavar="URL",
                        help="redis[s]://[:password@]host:port/db: share the routing state "
                             "with the other router replicas using it; overrides "
                             "state.redis-url")
    parser.add_argument("--version", "-V", action="store_true", help="print the version and exit")
    return parser
