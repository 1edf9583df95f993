"""A slow local storage backend for tests/openmmlab/test_resume.py.

``CheckpointHook(backend_args=dict(backend='slow_local', delay=0.5))`` writes each
checkpoint in ``chunks`` pieces, flushed to disk, ``delay`` seconds apart: a window in
which the test kills the training process mid-write. A config loads it with
``custom_imports=dict(imports=[..., 'resume_components'])`` and tests/openmmlab on
PYTHONPATH (helpers.tool_env).
"""
from __future__ import annotations

import os
import os.path as osp
import time

from mmengine.fileio import LocalBackend, register_backend


class SlowLocalBackend(LocalBackend):
    """mmengine's LocalBackend, whose ``put`` writes ``chunks`` flushed pieces with a
    ``delay`` (seconds) after each piece but the last."""

    def __init__(self, delay: float = 0.0, chunks: int = 4):
        super().__init__()
        self.delay, self.chunks = delay, chunks

    def put(self, obj: bytes, filepath) -> None:
        if not self.delay:
            return super().put(obj, filepath)
        os.makedirs(osp.dirname(filepath) or '.', exist_ok=True)
        step = -(-len(obj) // self.chunks)
        with open(filepath, 'wb') as f:
            for start in range(0, len(obj), step):
                if start:
                    time.sleep(self.delay)
                f.write(obj[start:start + step])
                f.flush()
                os.fsync(f.fileno())


register_backend('slow_local', SlowLocalBackend, force=True)
