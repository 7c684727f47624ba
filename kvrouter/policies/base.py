"""The scheduling-policy interface (docs/fastdeploy.md#policies).

A policy picks one instance among non-empty candidates (the routable instances of a role,
sorted by URL). Decisions are synchronous and pure apart from the policy's own state (a
round-robin counter, the shared prefix index): no I/O, no awaiting. Everything a decision needs
about the request is precomputed in a :class:`RequestView`.

Every policy class is declared once: decorated with :func:`register`, it is known by its
``name`` to :func:`kvrouter.policies.make_policy` and to config validation, and its
:meth:`Policy.from_config` builds it from the scheduler config (a policy with settings of its
own reads them into its own config dataclass with :func:`policy_config`).
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar, Self, TypeVar

import numpy as np

if TYPE_CHECKING:
    from _typeshed import DataclassInstance, SupportsDunderLT

    from kvrouter.config import SchedulerConfig
    from kvrouter.prefix.index import PrefixIndex
    from kvrouter.registry import Instance

__all__ = [
    "STRATEGIES",
    "STRATEGY_CACHE_AWARE",
    "STRATEGY_COST",
    "STRATEGY_EXPLORATION",
    "STRATEGY_IMBALANCE",
    "STRATEGY_POLICY",
    "STRATEGY_STALE",
    "VECTOR_MIN",
    "CandidateCache",
    "Policy",
    "RequestView",
    "Selection",
    "argmin",
    "load_terms",
    "policy_class",
    "policy_config",
    "policy_names",
    "register",
]

STRATEGY_POLICY = "policy"
STRATEGY_CACHE_AWARE = "cache_aware_scoring"
STRATEGY_IMBALANCE = "imbalance_fallback"
STRATEGY_STALE = "stale_metrics_fallback"
STRATEGY_COST = "cost_estimate"          # kv_cost: minimum estimated TTFT
STRATEGY_EXPLORATION = "exploration"     # kv_cost: a near-best candidate drawn at random
STRATEGIES = (STRATEGY_POLICY, STRATEGY_CACHE_AWARE, STRATEGY_IMBALANCE, STRATEGY_STALE,
              STRATEGY_COST, STRATEGY_EXPLORATION)


@dataclass(slots=True)
class RequestView:
    """What the policies see of a request.

    ``tokens`` holds model tokens when the prompt was tokenized (or was a token-id prompt),
    else ``None``. ``token_estimate`` is the token count when tokenized, else 2 × the code
    points of the rendered prompt (docs/fastdeploy.md#in-flight-accounting). ``hashes`` are the
    prefix block hashes, computed only when some policy needs them (a
    :class:`~kvrouter.prefix.hashing.HashList` when built by
    :func:`~kvrouter.prefix.view.build_request_view`; any list of ints works). ``model`` is the
    body's ``model`` as the client sent it (``None``: absent or not a string); ``Router.select``
    narrows the candidates to the instances serving it.
    """

    prompt: str | list[int]
    tokens: list[int] | None = None
    token_estimate: int = 0
    hashes: list[int] = field(default_factory=list)
    session_id: str | None = None
    model: str | None = None


@dataclass(slots=True)
class Selection:
    """A decision: the instance, how it was reached, and prefix-prediction data.

    ``lookup_blocks``/``hit_blocks`` feed ``kvrouter_prefix_lookup_blocks_total`` /
    ``_hit_blocks_total`` (cache-aware policies only). ``session_hit`` is ``None`` when the
    decision does not count for session-affinity statistics (docs/fastdeploy.md#session-affinity),
    else whether the request went to the same instance as its session's previous one.
    ``prefill_estimate`` is the policy's estimate of the prompt tokens ``instance`` will compute
    (its uncached prefill), for the lease the dispatcher acquires there
    (``Load.acquire(prefill=...)``); ``None`` when the policy makes none (the lease then counts
    the token estimate).
    """

    instance: Instance
    strategy: str = STRATEGY_POLICY
    hit_blocks: int = 0
    lookup_blocks: int = 0
    session_hit: bool | None = None
    prefill_estimate: int | None = None


class Policy(ABC):
    """One policy object per role (its state, e.g. a round-robin counter, is per role)."""

    name: ClassVar[str]
    needs_prefix: ClassVar[bool] = False          # wants ``RequestView.hashes``
    needs_remote_metrics: ClassVar[bool] = False  # wants background ``/metrics`` scrapes
    #: ``select`` changes nothing (no counter, random draw or record), so the default
    #: :meth:`explain` can name the pick by calling it
    select_is_pure: ClassVar[bool] = False

    def __init__(self, role: str) -> None:
        self.role = str(getattr(role, "value", role))

    @classmethod
    def from_config(
        cls,
        role: str,
        cfg: SchedulerConfig,
        index: PrefixIndex,
        *,
        rng: random.Random | None,
        clock: Callable[[], float],
    ) -> Self:
        """The policy for ``role`` as configured by ``cfg``.

        ``index`` is the router's shared prefix index, ``rng`` the source of randomness
        (``None``: a fresh ``random.Random()``), ``clock`` the clock of
        ``MetricsSnapshot.taken_at`` and of ``index.sweep``. This default suits a policy
        without settings; others override it.
        """
        return cls(role)

    @abstractmethod
    def select(self, candidates: Sequence[Instance], request: RequestView) -> Selection:
        """Pick one of ``candidates`` (non-empty, sorted by URL)."""

    def forget(self, identity: str) -> None:  # noqa: B027 (an optional hook)
        """The instance ``identity`` was removed: drop what this policy keeps about it
        (``Router`` calls it for every policy), so per-instance state does not grow with
        every instance ever seen. This default keeps nothing per instance."""

    def explain(self, candidates: Sequence[Instance], request: RequestView) -> list[dict[str, Any]]:
        """One row per candidate (same order) with what :meth:`select` would read now, for
        ``POST /v1/route/explain``; changes nothing (no record, lease, counter or draw).

        A row with ``"chosen": true`` is the instance ``select`` would pick now, and carries
        its ``"strategy"``; without one the pick cannot be told without making it (a random
        draw, a counter). This default: :func:`load_terms`, and the pick of a policy whose
        :attr:`select_is_pure`. Policies that score override it with their terms."""
        rows = [load_terms(inst) for inst in candidates]
        if self.select_is_pure:
            sel = self.select(candidates, request)
            for inst, row in zip(candidates, rows, strict=True):
                row["chosen"] = inst is sel.instance
                if inst is sel.instance:
                    row["strategy"] = sel.strategy
        return rows

    def __repr__(self) -> str:
        return f"{type(self).__name__}(role={self.role!r})"


# --- the registry: the one list of policies ----------------------------------------------------

_REGISTRY: dict[str, type[Policy]] = {}

_P = TypeVar("_P", bound=type[Policy])


def register(cls: _P) -> _P:
    """Class decorator: make the policy ``cls`` known under ``cls.name``.

    Registration order is the order of :func:`policy_names` (and of the names listed in an
    unknown-policy error).
    """
    name = cls.name
    if name in _REGISTRY:
        raise ValueError(f"policy '{name}' registered twice")
    _REGISTRY[name] = cls
    return cls


def policy_names() -> tuple[str, ...]:
    """Every registered policy name, in registration order."""
    return tuple(_REGISTRY)


def policy_class(name: str) -> type[Policy]:
    """The policy class registered as ``name``; ``ValueError`` for an unknown name."""
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ValueError(f"unknown policy '{name}' (valid: {', '.join(_REGISTRY)})")
    return cls


_C = TypeVar("_C", bound="DataclassInstance")


def policy_config(config_type: type[_C], cfg: SchedulerConfig, prefix: str = "") -> _C:
    """A policy's own config: the dataclass ``config_type`` with each field ``x`` read from the
    scheduler key ``<prefix>x`` (``kv_cost_`` + ``miss_weight``: YAML
    ``scheduler.kv-cost-miss-weight``). The keys, defaults and checks are declared in
    :class:`~kvrouter.config.SchedulerConfig`."""
    values: dict[str, Any] = {f.name: getattr(cfg, prefix + f.name) for f in fields(config_type)}
    return config_type(**values)


def load_terms(inst: Instance) -> dict[str, Any]:
    """The load counters every policy may read, as an explain row starts: the router's
    in-flight ``R``, ``T``, uncached prefill work and requests dispatched since the latest
    snapshot, and the instance's own running/waiting counts when that snapshot is fresh."""
    load = inst.load
    snap = inst.fresh_snapshot()
    return {"url": inst.url, "in_flight_requests": load.requests, "in_flight_tokens": load.tokens,
            "queued_prefill_tokens": load.prefill_tokens, "pending": load.pending,
            "snapshot": None if snap is None else {"running": snap.running,
                                                   "waiting": snap.waiting}}


def argmin(values: Sequence[SupportsDunderLT[Any]]) -> int:
    """Index of the smallest value; ties → the earliest index (the earliest URL)."""
    best = 0
    best_v = values[0]
    for i in range(1, len(values)):
        v = values[i]
        if v < best_v:
            best, best_v = i, v
    return best


#: Candidate count from which the ranked policies score with numpy arrays instead of a Python
#: loop (same arithmetic, same ties; a few numpy calls cost more than a short loop).
VECTOR_MIN = 33


class CandidateCache:
    """The identities and prefix-index numbers of the last candidate list a policy saw.

    The registry hands out one list per role until something changes, so with 1,000
    instances the per-candidate ``identity`` properties are read once per registry change, not
    on every decision. A list is recognised by identity (and length): candidate lists must not
    be mutated in place once passed to a policy.
    """

    __slots__ = ("_len", "_list", "ids", "index", "loads", "nums")

    def __init__(self, index: PrefixIndex) -> None:
        self.index = index
        self._list: object = None
        self._len = -1
        self.ids: list[str] = []
        self.nums: np.ndarray = np.zeros(0, dtype=np.int64)
        self.loads: list = []          # the candidates' Load objects (never replaced)

    def get(self, candidates: Sequence[Instance]) -> tuple[list[str], np.ndarray]:
        if candidates is not self._list or len(candidates) != self._len:
            self.ids = [inst.identity for inst in candidates]
            self.nums = self.index.instance_numbers(self.ids)
            self.loads = [inst.load for inst in candidates]
            self._list, self._len = candidates, len(candidates)
        return self.ids, self.nums
