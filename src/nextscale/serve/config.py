"""The server's settings, apart from FastAPI so that ``nextscale serve --help`` can show their defaults.

The engine's settings (token budget, KV memory, largest request) live in ``EngineConfig`` only: the server reads
them from the engine it serves.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerConfig:
    model_name: str = "nextscale"
    max_queue: int = 64  # requests waiting to start before new ones get 429
    drain_timeout: float = 60.0  # seconds to finish in-flight work on shutdown
