"""The engine process: runs tasks from the task and direct channels."""

from monq.engine.engine import Engine, EngineConfig

__all__ = ["Engine", "EngineConfig"]
