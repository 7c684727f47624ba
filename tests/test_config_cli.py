"""CLI/config failure paths (docs/fastdeploy.md#configuration) and registration parsing
(docs/fastdeploy.md#registration-and-heartbeat)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kvrouter.config import ConfigError, LogConfig, load_config
from kvrouter.instance import (
    RegistrationError,
    Role,
    load_register_yaml,
    parse_registration,
    parse_registration_bytes,
)
from kvrouter.logsetup import cleanup_logs


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvrouter", *args],
        cwd=cwd, capture_output=True, text=True, timeout=30,
    )


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


# --- CLI (subprocess) ---------------------------------------------------------------------------


def test_no_port_exits_1(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.yaml", "scheduler:\n  policy: random\n")
    for args in ([], ["--config_path", str(cfg)]):
        result = run_cli(*args, cwd=tmp_path)
        assert result.returncode == 1
        assert "failed to set router listen port" in result.stderr


@pytest.mark.parametrize("flag", ["--version", "-V", "-version"])
def test_version(tmp_path: Path, flag: str) -> None:
    result = run_cli(flag, cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.startswith("kvrouter")


@pytest.mark.parametrize("args", [["--bogus"], ["--port", "abc"], ["--conf", "x"]])
def test_usage_error_exits_2(tmp_path: Path, args: list[str]) -> None:
    assert run_cli(*args, cwd=tmp_path).returncode == 2


@pytest.mark.parametrize(
    ("yaml_text", "needles"),
    [
        ("server:\n  port: 9000\nscheduler:\n  policy: typo_policy\n", ["scheduler.policy", "typo_policy"]),
        ("manager:\n  health-check-interval-secs: 0\n", ["manager.health-check-interval-secs"]),
        ("scheduler:\n  cache-block-size: -1\n", ["scheduler.cache-block-size"]),
        ("server:\n  port: 9000\n    mode: x\n", ["invalid YAML at line 3"]),
        ("manager:\n  register-path: nowhere.yaml\n", ["manager.register-path", "nowhere.yaml"]),
    ],
    ids=["typo-policy", "interval-0", "block-size-neg", "bad-yaml", "missing-register"],
)
def test_config_errors_exit_1(tmp_path: Path, yaml_text: str, needles: list[str]) -> None:
    cfg = write(tmp_path / "config.yaml", yaml_text)
    # single-dash long flags, as fd-router accepts them
    result = run_cli("-port", "9000", "-config_path", str(cfg), cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    for needle in [str(cfg), *needles]:
        assert needle in result.stderr


def test_register_yaml_bad_role_exits_1(tmp_path: Path) -> None:
    reg = write(tmp_path / "register.yaml", """\
        instances:
          - {role: mixed, host_ip: 127.0.0.1, port: 8001}
          - {role: foo, host_ip: 127.0.0.1, port: 8002}
        """)
    cfg = write(tmp_path / "config.yaml", "manager:\n  register-path: register.yaml\n")
    result = run_cli("--port", "9000", "--config_path", str(cfg), cwd=tmp_path)
    assert result.returncode == 1
    assert str(reg) in result.stderr
    assert "instances[1]: invalid InstanceInfo format:invalid role: foo" in result.stderr


ALIAS_BOMB = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}' if i else '1'] * 9)}]\n"
                     for i in range(10))    # 9**10 items, a few hundred bytes of YAML


@pytest.mark.parametrize(
    ("yaml_text", "args", "needle"),
    [
        ('state:\n  redis-url: "redis://:s3cret@[::1:6379"\n', [],
         "{cfg}: state.redis-url: invalid URL redis://:***@[::1:6379: Invalid IPv6 URL"),
        ("", ["--redis-url", "redis://:s3cret@[::1:6379"],
         "config error: --redis-url: invalid URL redis://:***@[::1:6379"),
        ('scheduler:\n  tokenizer-url: "http://[::1:80"\n', [],
         "{cfg}: scheduler.tokenizer-url: invalid URL 'http://[::1:80': Invalid IPv6 URL"),
        ('scheduler:\n  tokenizer-url: "http://u:s3cret@[::1:80"\n', [],
         "{cfg}: scheduler.tokenizer-url: invalid URL 'http://u:***@[::1:80'"),
        ('tracing:\n  endpoint: "ftp://u:s3cret@collector"\n', [],
         "{cfg}: tracing.endpoint: must be an http:// or https:// URL, got "
         "'ftp://u:***@collector'"),
        ('scheduler:\n  tokenizer-url: "u:s3cret@tok:99999"\n', [],
         "{cfg}: scheduler.tokenizer-url: invalid URL 'u:***@tok:99999': Port out of range"),
        ("server:\n  name: " + "[" * 5000 + "]" * 5000 + "\n", [],
         "{cfg}: invalid YAML: nested too deeply"),
        ("server:\n  name: 2020-13-45\n", [], "{cfg}: invalid YAML: month must be in 1..12"),
        (ALIAS_BOMB + "server:\n  name: *l9\n", [], "{cfg}: server.name: must be a string, got"),
    ],
    ids=["redis-url", "redis-url-flag", "tokenizer-url", "tokenizer-url-password",
         "endpoint-password", "no-scheme-password", "deep", "bad-date", "aliases"],
)
def test_hostile_config_values_are_config_errors(tmp_path: Path, yaml_text: str,
                                                 args: list[str], needle: str) -> None:
    """Malformed URLs and YAML the parser refuses with other errors than its own: one line,
    ``config error: <file>: <key>: …``, no traceback, no password, in bounded time."""
    cfg = write(tmp_path / "config.yaml", yaml_text)
    result = run_cli("--port", "9000", "--config_path", str(cfg), *args, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert needle.format(cfg=cfg) in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "s3cret" not in result.stderr
    assert len(result.stderr) < 2000


def test_register_yaml_nested_too_deeply_exits_1(tmp_path: Path) -> None:
    reg = write(tmp_path / "register.yaml", "instances: " + "[" * 5000 + "]" * 5000 + "\n")
    cfg = write(tmp_path / "config.yaml", "manager:\n  register-path: register.yaml\n")
    result = run_cli("--port", "9000", "--config_path", str(cfg), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == f"config error: {reg}: invalid YAML: nested too deeply"


# --- load_config -------------------------------------------------------------------------------


def test_unknown_key_warns_and_zero_is_literal(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.yaml", """\
        server: {port: "8080", splitwise: false}
        scheduler:
          interval-cleanup-secs: 5
          load-balance-weight: 0
        log: {level: WARN}
        extra: {}
        """)
    config, warnings = load_config(str(cfg), port=9100, splitwise=True)
    assert warnings == [
        f"config warning: {cfg}: unknown key 'scheduler.interval-cleanup-secs' ignored",
        f"config warning: {cfg}: unknown key 'extra' ignored",
    ]
    assert config.scheduler.load_balance_weight == 0
    assert config.server.port == 9100 and config.server.splitwise
    assert config.log.level == "warn" and config.config_path == str(cfg)


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("scheduler:\n  balance-rel-threshold: 1.5\n", "scheduler.balance-rel-threshold: must be between 0 and 1, got 1.5"),
        ("scheduler:\n  metrics-scrape-timeout-secs: 3\n", "scheduler.metrics-scrape-timeout-secs: must not exceed"),
        ("server:\n  splitwise: 1\n", "server.splitwise: must be a boolean, got 1"),
        ("server:\n  port: 70000\n", "server.port: must be between 0 and 65535, got 70000"),
        ("log:\n  level: verbose\n", "log.level: must be one of debug, info, warn, error"),
        ("manager:\n  health-check-endpoint: health\n", "manager.health-check-endpoint: must start with '/'"),
    ],
)
def test_config_value_errors(tmp_path: Path, yaml_text: str, message: str) -> None:
    cfg = write(tmp_path / "c.yaml", yaml_text)
    with pytest.raises(ConfigError) as err:
        load_config(str(cfg), port=1)
    assert str(err.value).startswith(f"config error: {cfg}: {message}")


def test_register_path_resolves_against_config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "conf").mkdir()
    write(tmp_path / "conf" / "register.yaml", "instances:\n  - {role: decode, host_ip: h1, port: 1}\n")
    cfg = write(tmp_path / "conf" / "c.yaml", "manager:\n  register-path: register.yaml\n")
    monkeypatch.chdir(tmp_path)
    config, _ = load_config(str(cfg), port=0)
    assert config.manager.register_path == str(tmp_path / "conf" / "register.yaml")
    [entry] = load_register_yaml(config.manager.register_path, splitwise=True)
    assert entry.role is Role.DECODE and entry.url == "http://h1:1"


def test_cleanup_logs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FD_LOG_DIR", str(tmp_path))
    (tmp_path / "router.log").write_bytes(b"x" * 100)
    old, mid, new = (tmp_path / f"router.log.2026-01-0{i}" for i in (1, 2, 3))
    for age_days, path in ((10, old), (2, mid), (1, new)):
        path.write_bytes(b"x" * 600_000)
        stamp = os.path.getmtime(path) - age_days * 86400
        os.utime(path, (stamp, stamp))
    removed = cleanup_logs(LogConfig(max_age_days=7, max_total_size_mb=1))
    assert removed == [old, mid] and new.exists()


# --- registration parsing (also covered over HTTP by the server tests) ---------------------------

BASE = {"host_ip": "127.0.0.1", "port": 8080}
FMT = "Invalid InstanceInfo JSON format: "
BAD = "invalid InstanceInfo format:"


@pytest.mark.parametrize(
    ("payload", "splitwise", "message"),
    [
        ({"host_ip": "h", "port": 1}, False, BAD + "role is required"),
        ({**BASE, "role": None}, False, BAD + "role is required"),
        ({**BASE, "role": "custom"}, False, BAD + "invalid role: custom"),
        ({**BASE, "role": 99}, False, FMT + "invalid role integer: 99"),
        ({"role": "mixed", "port": 1}, False, BAD + "host_ip is required"),
        ({"role": "mixed", "host_ip": "bad host!", "port": 1}, False, BAD + "invalid host_ip: bad host!"),
        ({"role": "mixed", "host_ip": "h"}, False, BAD + "port is required"),
        ({**BASE, "role": "mixed", "port": 99999}, False, BAD + "invalid port: 99999"),
        ({**BASE, "role": "mixed", "port": 0}, False, BAD + "invalid port: 0"),
        ({**BASE, "role": "mixed", "port": 8080.0}, False, FMT),
        ({**BASE, "role": "mixed", "port": True}, False, FMT),
        ({**BASE, "role": "prefill", "connector_port": "x"}, True, BAD + "invalid connector_port: x"),
        ({**BASE, "role": "prefill", "engine_worker_queue_port": 0}, True, BAD + "invalid engine_worker_queue_port: 0"),
        ({**BASE, "role": "mixed", "transfer_protocol": ["tcp"]}, False, BAD + "invalid protocol: tcp"),
        ({**BASE, "role": "decode", "rdma_ports": [99999]}, True, BAD + "rdma_ports[0] invalid port: 99999"),
        ({**BASE, "role": "decode", "rdma_ports": [1.5]}, True, FMT),
        ({**BASE, "role": "decode", "rdma_ports": [True]}, True, FMT),
        ({**BASE, "role": "decode", "device_ids": "0,1"}, True, FMT),
        ({**BASE, "role": "mixed", "metrics_port": 70000}, False, BAD + "invalid metrics_port: 70000"),
        ({**BASE, "role": "mixed", "tp_size": 0}, False, BAD + "invalid tp_size: 0"),
        ({**BASE, "role": "mixed", "is_paused": "yes"}, False, BAD + "invalid is_paused: yes"),
        ({**BASE, "role": "mixed"}, True, "splitwise mode only supports PREFILL/DECODE instances"),
        ({**BASE, "role": "prefill"}, False, "only MIXED instances are allowed"),
        ({"port": 99999}, False, BAD + "role is required"),  # first failure wins
        ([], False, FMT),
    ],
)
def test_registration_errors(payload: object, splitwise: bool, message: str) -> None:
    with pytest.raises(RegistrationError) as err:
        parse_registration(payload, splitwise=splitwise)
    assert err.value.status == 400
    assert err.value.body["code"] == 400
    msg = err.value.body["msg"]
    assert msg.startswith(message) if message == FMT else msg == message


@pytest.mark.parametrize("raw", [b"", b"invalid json", b"[1]"])
def test_registration_bad_body(raw: bytes) -> None:
    with pytest.raises(RegistrationError) as err:
        parse_registration_bytes(raw, splitwise=False)
    assert err.value.body["msg"].startswith(FMT)


def test_registration_accepted_forms() -> None:
    mixed = parse_registration({"role": "MIXED", "host_ip": "127.0.0.1", "port": "8080"}, splitwise=False)
    assert (mixed.role, mixed.port, mixed.metrics_port, mixed.is_paused) == (Role.MIXED, "8080", "8080", False)

    pd = parse_registration_bytes(
        b'{"role":1,"host_ip":"HTTPS://Node-1.Example/","port":8097,"rdma_ports":[7100,"7101"],'
        b'"device_ids":[0,"1"],"metrics_port":"8003","tp_size":"2","is_paused":true,"version":"v2"}',
        splitwise=True,
    )
    assert pd.role is Role.PREFILL and pd.url == "https://node-1.example:8097"
    assert (pd.rdma_ports, pd.device_ids, pd.metrics_port) == (("7100", "7101"), ("0", "1"), "8003")
    assert (pd.tp_size, pd.tp, pd.is_paused, pd.version) == (2, 2, True, "v2")

    for host in ("::1", "[0:0::1]", "http://[::1]/"):
        v6 = parse_registration({"role": 0, "host_ip": host, "port": 9}, splitwise=False)
        assert (v6.url, v6.identity) == ("http://[::1]:9", "[::1]:9")
    assert parse_registration({**BASE, "role": "mixed", "host_ip": "localhost"}, splitwise=False).host == "localhost"
