"""The two errors ``sdfast.export`` raises: ValueErrors, like CheckpointError, so the CLI reports them in one line."""


class ExportError(ValueError):
    """An export that cannot be done, or a graph that does not compute what the torch model computes."""


class EngineError(ValueError):
    """A TensorRT engine that cannot be built or used: no TensorRT, a parse or build failure, a stale or corrupt
    engine, or a shape outside the engine's profiles."""
