"""Let torch >= 2.6 load mmengine 0.10.7 checkpoints with ``weights_only=True``.

mmengine's ``torch.load`` calls pass no ``weights_only``, so torch >= 2.6 loads with its
safe unpickler, which refuses the globals an mmengine checkpoint holds: the message hub's
``HistoryBuffer`` objects, the numpy arrays and scalars inside them, and
``getattr(HistoryBuffer, 'min')``-style references to its statistics methods.

We allow-list exactly those globals. ``builtins.getattr`` itself would let a checkpoint
reach any attribute of any allowed object, so under that name we register a getattr that
only resolves HistoryBuffer's registered statistics methods and refuses everything else.
weights_only stays on for every other global.
"""
from __future__ import annotations

import numpy as np
import torch
from mmengine.logging.history_buffer import HistoryBuffer

try:  # numpy >= 2 moved the implementation module; pickles name the one they came from.
    from numpy._core import multiarray as _multiarray
    _NP_CORE = 'numpy._core.multiarray'
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray
    _NP_CORE = 'numpy.core.multiarray'


# The names mmengine pickles as getattr(HistoryBuffer, name). A fixed set: the class's
# _statistics_methods dict can be extended by a loaded HistoryBuffer's __setstate__.
HISTORY_BUFFER_METHODS = frozenset({'min', 'max', 'current', 'mean'})


def history_buffer_getattr(obj, name: str):
    """getattr restricted to HistoryBuffer's built-in statistics methods."""
    if obj is HistoryBuffer and name in HISTORY_BUFFER_METHODS:
        return getattr(obj, name)
    raise torch.serialization.pickle.UnpicklingError(
        f'checkpoint asks for getattr({obj!r}, {name!r}); only HistoryBuffer statistics '
        f'methods {sorted(HISTORY_BUFFER_METHODS)} are allowed')


# What mmengine 0.10.7 checkpoints hold beyond torch's defaults (found with
# torch.serialization.get_unsafe_globals_in_checkpoint on a Runner checkpoint).
MMENGINE_SAFE_GLOBALS = [
    HistoryBuffer,
    np.ndarray,
    np.dtype,
    (_multiarray._reconstruct, f'{_NP_CORE}._reconstruct'),
    (_multiarray.scalar, f'{_NP_CORE}.scalar'),
    (history_buffer_getattr, 'builtins.getattr'),
]
# numpy >= 1.25 pickles dtypes of arrays through their DType classes.
MMENGINE_SAFE_GLOBALS += [type(np.dtype(t)) for t in
                          (np.float64, np.float32, np.float16, np.int64, np.int32, np.int16,
                           np.int8, np.uint64, np.uint32, np.uint16, np.uint8, np.bool_)]
torch.serialization.add_safe_globals(MMENGINE_SAFE_GLOBALS)
