"""The engine adapters by engine name."""

from __future__ import annotations

from kvrouter.backends.base import EngineAdapter
from kvrouter.backends.fastdeploy import FastDeployAdapter
from kvrouter.backends.sglang import SglangAdapter
from kvrouter.backends.vllm import VllmAdapter

DEFAULT_ENGINE = "fastdeploy"


class Adapters:
    """The data-plane adapter of each engine that kvrouter can dispatch PD requests to."""

    def __init__(self, disaggregate_info_format: str = "flat") -> None:
        self._by_name: dict[str, EngineAdapter] = {
            "fastdeploy": FastDeployAdapter(disaggregate_info_format),
            "vllm": VllmAdapter(),
            "sglang": SglangAdapter(),
        }
        self.default = self._by_name[DEFAULT_ENGINE]

    def get(self, engine: str | None) -> EngineAdapter | None:
        """The adapter of ``engine`` (``None``: FastDeploy's); ``None`` if it has no PD."""
        return self._by_name.get(engine or DEFAULT_ENGINE)
