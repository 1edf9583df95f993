"""Shared pytest fixtures. Plain helper functions are in tests/helpers.py.

Being here (pytest's default "prepend" import mode, no __init__.py) puts tests/ on sys.path,
so that the modules of tests/core and tests/openmmlab can `import helpers`.
"""
import pytest
from helpers import write_cityscapes


@pytest.fixture(scope='session')
def cityscapes(tmp_path_factory):
    """A tiny Cityscapes folder: leftImg8bit/*_leftImg8bit.png and
    gtFine/*_gtFine_labelTrainIds.png (train ids 0..18, 255 ignored), 128x256, two images
    each in train and val."""
    return write_cityscapes(tmp_path_factory.mktemp('cityscapes'),
                            splits=(('train', 2), ('val', 2)), size=(128, 256))


@pytest.fixture(params=['lean', 'reference'])
def scalar_path(request):
    """Runs a test on both CPU paths of the layers: the lean one (per-layer scalars read on
    the host, the CPU default) and the reference (scalars on the device, as on a GPU)."""
    from robustbn import lean
    with lean.lean_path(request.param == 'lean'):
        yield request.param
