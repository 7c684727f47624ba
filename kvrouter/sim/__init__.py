"""Simulated FastDeploy instances for tests and local clusters
(docs/fastdeploy.md#instance-surface).

``SimInstance(SimConfig(...))`` runs in the caller's event loop; ``kvrouter sim`` (see
:mod:`kvrouter.sim.cli`) starts several of them in one process.
"""

from kvrouter.sim.config import Knobs, SimConfig
from kvrouter.sim.core.params import EngineParams
from kvrouter.sim.engine import Engine, GenRequest, TokenOut
from kvrouter.sim.instance import HeartbeatRecord, ReceivedRequest, SimInstance

__all__ = [
    "Engine",
    "EngineParams",
    "GenRequest",
    "HeartbeatRecord",
    "Knobs",
    "ReceivedRequest",
    "SimConfig",
    "SimInstance",
    "TokenOut",
]
