"""The oracle: a cluster-side policy that sees every core's true prefix cache and queue."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvrouter.instance import Role
from kvrouter.policies.base import Policy, RequestView, Selection
from kvrouter.registry import Instance

if TYPE_CHECKING:
    from kvrouter.sim.cluster.des import Sim

__all__ = ["OraclePolicy"]


class OraclePolicy(Policy):
    """Zero-lag, perfect-knowledge baseline: lowest estimated TTFT.

    For a prefill-capable role, estimated TTFT on a candidate = (queued prefill tokens on its
    core + this request's tokens not in its core's cache right now) × seconds per prefill
    token (calibrated per core); ties → fewer in-flight requests, then the earliest URL. For
    the decode role: fewest requests on the core. Needs the core's ``cached_prefix_tokens``.
    """

    name = "oracle"

    def __init__(self, role: str, sim: Sim) -> None:
        super().__init__(role)
        self._sim = sim

    def select(self, candidates: Sequence[Instance], request: RequestView) -> Selection:
        sim = self._sim
        tokens = request.tokens if request.tokens is not None else []
        memo: dict[int, list[int]] = {}
        best_i = 0
        best_key: tuple[float, int] | None = None
        for i, inst in enumerate(candidates):
            node = sim.nodes_by_identity[inst.identity]
            if self.role == Role.DECODE.value:
                key = (float(node.inflight), inst.load.requests)
            else:
                hit = sim.cached(node, tokens, memo)
                est = (node.pending_prefill + len(tokens) - hit) * node.sec_per_prefill_token
                key = (est, inst.load.requests)
            if best_key is None or key < best_key:
                best_i, best_key = i, key
        return Selection(candidates[best_i])

