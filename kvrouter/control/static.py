"""``register.yaml`` re-read while the router runs (``manager.register-path``).

Engines that never call ``/register`` (vLLM, SGLang, llama.cpp, any OpenAI server) are listed in
the file; editing it adds and removes them without a restart. The leader's background task
compares the file's inode, mtime and size every :data:`WATCH_SECS` (never per request); when
they changed it parses the file again and the static instances follow it: new entries are
probed and added as at startup, removed entries are removed, changed ones updated. Instances
that registered themselves by heartbeat are never touched. A file that cannot be read or parsed
keeps the current set and logs one error naming the file and the problem. While the file stays
the same, each check still removes the static instances its last version does not list: a
sibling worker that started before an edit can bring one back from the older list (see
:mod:`kvrouter.workers.supervisor`).

Write the file atomically (a new file renamed over the old one): a half-written file that still
parses is applied as it is, until the next change.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import replace

from kvrouter.config import MAX_YAML_BYTES, ConfigError
from kvrouter.control.health import HealthMonitor
from kvrouter.instance import InstanceInfo, load_register_yaml
from kvrouter.registry import Registry

log = logging.getLogger("kvrouter.static")

WATCH_SECS = 2.0
MAX_FILE_BYTES = MAX_YAML_BYTES   # a larger register.yaml is refused before it is read
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
        self._listed: set[str] | None = None    # identities in the last version that parsed

    async def run(self, interval: float = WATCH_SECS) -> None:
        """Check now (the file may have changed since startup read it), then every
        ``interval`` seconds."""
        while True:
            try:
                await self.check()
            except Exception:   # a bug while applying must not end the watch unnoticed
                log.exception("config error: %s: applying it failed", self.path)
            await asyncio.sleep(interval)

    def _stat(self) -> _Signature:
        st = os.stat(self.path)
        return st.st_ino, st.st_mtime_ns, st.st_size

    async def check(self) -> None:
        """Re-read the file if it changed and apply it; else remove the static instances it
        does not list."""
        try:
            signature = self._stat()
        except OSError as exc:
            self._failed(f"config error: {self.path}: cannot read file: {exc.strerror or exc}")
            return
        if signature == self._signature:
            if self._listed is not None:
                self._remove_unlisted(self._listed)
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
        except Exception as exc:        # anything else the file makes the parser raise
            self._signature = signature
            self._failed(f"config error: {self.path}: cannot parse: {type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:200]}")
            return
        self._signature = signature
        self._error = None
        await self.apply(infos)

    def _failed(self, message: str) -> None:
        if message != self._error:
            self._error = message
            kept = sum(1 for inst in self.registry.all() if inst.static)
            log.error("%s; keeping the %d static instances", message, kept)

    def _remove_unlisted(self, listed: set[str]) -> None:
        for gone in self.registry.all():
            if gone.static and gone.identity not in listed:
                log.info("static instance %s removed: no longer in %s", gone.url, self.path)
                self.registry.remove(gone, REMOVED)

    async def apply(self, infos: list[InstanceInfo]) -> None:
        """Make the static instances those of ``infos`` (a later entry with the same identity
        wins, as at startup)."""
        wanted = {info.identity: info for info in infos}
        self._listed = set(wanted)
        self._remove_unlisted(self._listed)
        registry = self.registry
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
