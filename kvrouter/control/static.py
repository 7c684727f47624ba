"""``register.yaml`` re-read while the router runs (``manager.register-path``).

Engines that never call ``/register`` (vLLM, SGLang, llama.cpp, any OpenAI server) are listed in
the file; editing it adds and removes them without a restart. The leader's background task
compares the file's inode, mtime and size every :data:`WATCH_SECS` (never per request); when
they changed it parses the file again and the static instances follow it: new entries are
probed and added as at startup, removed entries are removed, changed ones updated. Instances
that registered themselves by heartbeat are never touched. A file that cannot be read or parsed
keeps the current set and logs one error naming the file and the problem.

Write the file atomically (a new file renamed over the old one): a half-written file that still
parses is applied as it is, until the next change.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import replace

from kvrouter.config import ConfigError
from kvrouter.control.health import HealthMonitor
from kvrouter.instance import InstanceInfo, load_register_yaml
from kvrouter.registry import Registry

log = logging.getLogger("kvrouter.static")

WATCH_SECS = 2.0
MAX_FILE_BYTES = 4 << 20      # a register.yaml larger than this is refused (parsed in memory)
REMOVED = "static_removed"    # the removal reason (registry ``on_removed``)

_Signature = tuple[int, int, int]


class StaticInstances:
    """Keeps the registry's static instances equal to the entries of ``path``."""

    def __init__(self, registry: Registry, health: HealthMonitor, path: str, *,
                 splitwise: bool, probe_timeout: float) -> None:
        self.registry = registry
        self.health = health
        self.path = path
        self.splitwise = splitwise
        self.probe_timeout = probe_timeout
        self._signature: _Signature | None = None   # of the file last parsed (or refused)
        self._error: str | None = None               # the last error logged

    async def run(self, interval: float = WATCH_SECS) -> None:
        """Check now (the file may have changed since startup read it), then every
        ``interval`` seconds."""
        while True:
            await self.check()
            await asyncio.sleep(interval)

    def _stat(self) -> _Signature:
        st = os.stat(self.path)
        return st.st_ino, st.st_mtime_ns, st.st_size

    async def check(self) -> None:
        """Re-read the file if it changed and apply it."""
        try:
            signature = self._stat()
        except OSError as exc:
            self._failed(f"config error: {self.path}: cannot read file: {exc.strerror or exc}")
            return
        if signature == self._signature:
            return
        if signature[2] > MAX_FILE_BYTES:
            self._signature = signature
            self._failed(f"config error: {self.path}: larger than {MAX_FILE_BYTES >> 20} MiB")
            return
        try:
            infos = await asyncio.to_thread(load_register_yaml, self.path,
                                            splitwise=self.splitwise)
            if self._stat() != signature:
                return                  # written while being read: read again next time
        except ConfigError as exc:
            self._signature = signature
            self._failed(str(exc))
            return
        except OSError:
            return                      # replaced while being read: read again next time
        self._signature = signature
        self._error = None
        await self.apply(infos)

    def _failed(self, message: str) -> None:
        if message != self._error:
            self._error = message
            kept = sum(1 for inst in self.registry.all() if inst.static)
            log.error("%s; keeping the %d static instances", message, kept)

    async def apply(self, infos: list[InstanceInfo]) -> None:
        """Make the static instances those of ``infos`` (a later entry with the same identity
        wins, as at startup)."""
        wanted = {info.identity: info for info in infos}
        registry = self.registry
        for gone in registry.all():
            if gone.static and gone.identity not in wanted:
                log.info("static instance %s removed: no longer in %s", gone.url, self.path)
                registry.remove(gone, REMOVED)
        new: list[InstanceInfo] = []
        for ident, info in wanted.items():
            inst = registry.get(ident)
            if inst is None:
                new.append(info)
                continue
            if not inst.static:
                continue                # registered by heartbeat: its heartbeats manage it
            if info.engine is None:     # recognised from its /metrics meanwhile: kept
                info = replace(info, engine=inst.info.engine)
            if info != inst.info:
                log.info("static instance %s updated from %s", info.url, self.path)
                registry.update(inst, info)
        if not new:
            return
        results = await asyncio.gather(
            *(self.health.probe_url(info.url, self.probe_timeout) for info in new))
        for info, res in zip(new, results, strict=True):
            if registry.get(info.identity) is not None:
                continue                # registered by a heartbeat while being probed
            registry.add(info, static=True, healthy=res.ok)
            if res.ok:
                log.info("static instance %s added from %s", info.url, self.path)
            else:
                log.warning("static instance %s added from %s, not healthy (%s)", info.url,
                            self.path, res.error)
