"""robustbn's layers in mmengine's MODELS registry (the layers themselves: tests/core)."""
from mmengine.registry import MODELS

from robustbn import GpreBN2d, JSBN1d, JSBN2d, JSBN3d, SyncGpreBN, SyncJSBN


def test_jsbn_layers_are_registered_and_build():
    for name, cls in [('JSBN', JSBN2d), ('JSBN1d', JSBN1d), ('JSBN2d', JSBN2d), ('JSBN3d', JSBN3d),
                      ('SyncJSBN', SyncJSBN)]:
        assert MODELS.get(name) is cls
    layer = MODELS.build(dict(type='SyncJSBN', num_features=4, estimator='classic'))
    assert isinstance(layer, SyncJSBN) and layer.estimator == 'classic'


def test_gprebn_layers_are_registered():
    assert MODELS.get('GpreBN') is GpreBN2d and MODELS.get('SyncGpreBN') is SyncGpreBN


PARTIAL = '''
import sys, warnings
sys.modules['mmcv'] = None  # an mmengine (or mmpretrain) install without mmcv
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    import robustbn
from mmengine.registry import HOOKS, MODELS
assert MODELS.get('SyncJSBN') is robustbn.SyncJSBN and MODELS.get('GpreBN') is robustbn.GpreBN2d
assert HOOKS.get('ShrinkageMonitorHook') is None  # the components need the openmmlab extra
assert any("mmcv is not installed" in str(w.message) for w in caught), caught
print('ok')
'''


def test_norm_layers_register_with_mmengine_alone():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, '-c', PARTIAL], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == 'ok', out.stderr[-3000:]


def test_components_are_registered():
    from mmengine.registry import HOOKS, LOOPS
    assert HOOKS.get('ShrinkageMonitorHook') is not None
    assert HOOKS.get('AdversarialEvalHook') is not None
    assert LOOPS.get('TestTimeAdaptLoop') is not None
