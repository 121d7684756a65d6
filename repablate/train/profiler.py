"""The Trainer's profiler when none is configured: Lightning's default, which profiles nothing, made cheap."""

from __future__ import annotations

from contextlib import nullcontext

from lightning.pytorch.profilers import PassThroughProfiler


class NoProfiler(PassThroughProfiler):
    """Lightning's PassThroughProfiler (the Trainer's default: records nothing) with ``profile`` returning one
    shared no-op context manager instead of a new generator-based one. Lightning enters ``profile`` around every
    callback hook of every callback and every module and strategy hook, some 70 times a training step; a
    configured profiler (``+trainer.profiler=simple``) is used as given."""

    _nothing = nullcontext()

    def profile(self, action_name: str) -> nullcontext:
        return self._nothing
