"""The events worker processes exchange, as plain JSON objects (``"t"`` = the kind).

Each shared kind is either an idempotent, versioned record (last writer wins on ``v``) or a
per-sender snapshot that replaces the sender's previous one, and times are wall-clock seconds
(``time.time()``), not a process's monotonic clock: the same shapes router replicas share
through Redis (:mod:`kvrouter.shared.redis`, which keeps its own key layout).

=========  ========================================================================
kind       fields
=========  ========================================================================
``reg``    ``id``, ``v``, ``i`` (registration), ``st`` static
``hl``     ``id``, ``v``, ``s`` state, ``f``/``ok`` streaks, ``since`` (wall clock or null)
``del``    ``id``, ``v``, ``r`` reason
``snap``   ``id``, ``s`` = [running, waiting, taken_at (wall), available_gpu_block_num,
           max_batch_size, gpu_cache_usage_perc]
``load``   ``n`` sequence, ``l`` = {id: [R, T, prefill_tokens, prefill_leases, pending,
           pending_prefill, pending_prefill_leases]} (the sender's share), ``p`` 1: only the
           shares that changed (an all-zero share: gone), else the whole share
``rec``    ``r`` = [[id, [block hash, …]], …]
``sess``   ``s`` = [[role, session_id, id], …]
``ctr``    ``c`` = the six ``[stats]`` counter totals
=========  ========================================================================

Process-local kinds: ``hello`` (``w`` worker number, ``pid``), ``bar``/``ack`` (``id``: a
barrier after a registration), ``mreq``/``mrep`` (``id``, ``m``: counter samples for a
``/metrics`` answer), ``dump`` (``r`` as in ``rec``: the whole prefix index, sent to a
restarted worker).

``v`` (version) = ``[wall-clock seconds, worker number]``, compared as a tuple.
"""

from __future__ import annotations

import dataclasses
import time

from kvrouter.backends.snapshot import MetricsSnapshot
from kvrouter.instance import InstanceInfo, Role
from kvrouter.load import LoadShare

#: the :class:`~kvrouter.load.LoadShare` fields of a ``load`` event's lists, in order
LOAD_FIELDS = tuple(f.name for f in dataclasses.fields(LoadShare))

_INFO_FIELDS = tuple(f.name for f in dataclasses.fields(InstanceInfo))
_TUPLES = frozenset({"transfer_protocol", "rdma_ports", "device_ids", "connected_decodes",
                     "models"})


def info_to_json(info: InstanceInfo) -> dict:
    out = {name: getattr(info, name) for name in _INFO_FIELDS}
    out["role"] = info.role.value
    return out


def info_from_json(data: dict) -> InstanceInfo:
    kw = {name: data[name] for name in _INFO_FIELDS if name in data}
    kw["role"] = Role(kw["role"])
    for name in _TUPLES & kw.keys():
        kw[name] = tuple(kw[name] or ())
    return InstanceInfo(**kw)


def wall(mono: float) -> float:
    """A ``time.monotonic()`` instant as wall-clock seconds."""
    return time.time() - (time.monotonic() - mono)


def mono(wall_secs: float) -> float:
    """Wall-clock seconds as a ``time.monotonic()`` instant of this process."""
    return time.monotonic() - (time.time() - wall_secs)


def snapshot_to_json(snap: MetricsSnapshot) -> list:
    return [snap.running, snap.waiting, wall(snap.taken_at), snap.available_gpu_block_num,
            snap.max_batch_size, snap.gpu_cache_usage_perc]


def snapshot_from_json(data: list) -> MetricsSnapshot:
    running, waiting, taken, blocks, batch, usage = data
    return MetricsSnapshot(running=running, waiting=waiting, taken_at=mono(taken),
                           available_gpu_block_num=blocks, max_batch_size=batch,
                           gpu_cache_usage_perc=usage)


def shares_to_json(shares: dict[str, LoadShare]) -> dict[str, list[int]]:
    """A ``load`` event's ``l``: each instance's share as a list in :data:`LOAD_FIELDS` order."""
    return {ident: [getattr(share, name) for name in LOAD_FIELDS]
            for ident, share in shares.items()}


def shares_from_json(data: dict[str, list[int]]) -> dict[str, LoadShare]:
    return {ident: LoadShare(*values) for ident, values in data.items()}
