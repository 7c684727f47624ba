"""kvrouter: a cache-aware, load-aware router for LLM inference clusters."""

__version__ = "0.1.0"
