"""Scheduling policies (docs/fastdeploy.md#policies): one object per role, built by
:func:`make_policy`.

A policy is added by decorating its class with :func:`~kvrouter.policies.base.register` (and,
for a new module, adding the module to ``_MODULES``); its settings are keys of
:class:`~kvrouter.config.SchedulerConfig`. The interface and the shared types are in
:mod:`kvrouter.policies.base`.
"""

from __future__ import annotations

import importlib
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvrouter.policies.base import Policy, policy_class, policy_names, register

if TYPE_CHECKING:
    from kvrouter.config import SchedulerConfig
    from kvrouter.prefix.index import PrefixIndex

__all__ = ["POLICY_NAMES", "make_policy", "policy_class", "policy_names", "register"]

#: The modules defining policies. Importing one registers its policies, so this order is the
#: order of :func:`policy_names`: fd-router's policies in the order of
#: docs/fastdeploy.md#policies, then kvrouter's own.
_MODULES = ("simple", "load", "metrics_score", "cache_aware", "sglang", "kv_cost")
for _module in _MODULES:
    importlib.import_module(f"{__name__}.{_module}")

#: Every valid policy name (all registered policies), in registration order.
POLICY_NAMES: tuple[str, ...] = policy_names()


def make_policy(
    name: str,
    role: str,
    cfg: SchedulerConfig,
    index: PrefixIndex,
    rng: random.Random | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> Policy:
    """A fresh policy object for one role.

    ``index`` is the router's shared prefix index (used by the cache-aware policies);
    ``clock`` must be the clock of ``MetricsSnapshot.taken_at`` and of ``index.sweep``.
    Raises ``ValueError`` for an unknown name.
    """
    return policy_class(name).from_config(role, cfg, index, rng=rng, clock=clock)
