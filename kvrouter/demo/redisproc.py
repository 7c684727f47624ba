"""A throw-away ``redis-server`` on 127.0.0.1 for the replica demo, the overhead bench and the
tests: persistence off (``--save "" --appendonly no``), so a restart starts empty, as a Redis
lost without persistence would."""

from __future__ import annotations

import asyncio
import shutil
import signal
from pathlib import Path

from kvrouter.bench.external import free_port

MISSING = ("redis-server not found on PATH: install it (Debian: apt-get install redis-server) "
           "to run router replicas sharing state through Redis")


def redis_server_binary() -> str | None:
    """``redis-server`` on PATH, else ``None``."""
    return shutil.which("redis-server")


class RedisServer:
    """``redis-server`` on ``port`` (default: a free one), its files in ``workdir``;
    ``password``: clients must authenticate (``requirepass``)."""

    def __init__(self, workdir: Path, port: int | None = None,
                 password: str | None = None) -> None:
        binary = redis_server_binary()
        if binary is None:
            raise FileNotFoundError(MISSING)
        self.binary = binary
        self.workdir = workdir
        self.port = port or free_port()
        self.password = password
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    async def start(self, timeout: float = 10.0) -> None:
        """Start it and return once it answers ``PING``."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.workdir / f"redis-{self.port}.log", "ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.workdir), "--protected-mode", "yes",
                *(["--requirepass", self.password] if self.password else []),
                stdout=log, stderr=log, start_new_session=True)
        try:
            async with asyncio.timeout(timeout):
                while not await self.ping():
                    if self.proc.returncode is not None:
                        raise RuntimeError(f"redis-server exited ({self.proc.returncode}); see "
                                           f"{self.workdir}/redis-{self.port}.log")
                    await asyncio.sleep(0.02)
        except BaseException:
            await self.stop()
            raise

    async def ping(self) -> bool:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        try:
            writer.write(b"*1\r\n$4\r\nPING\r\n")
            await writer.drain()
            # without the password, redis answers -NOAUTH: it is up all the same
            return (await asyncio.wait_for(reader.readline(), 2)).startswith((b"+PONG",
                                                                               b"-NOAUTH"))
        except (OSError, TimeoutError):
            return False
        finally:
            writer.close()

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the process we started (SIGKILL if it has not exited within 5 s)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(sig)
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            proc.kill()
            await proc.wait()
