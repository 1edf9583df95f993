"""The core needs torch alone: importing robustbn imports no OpenMMLab package when none
is installed (here: hidden from the import system in a subprocess), and the layers work."""
import subprocess
import sys

import robustbn

HIDDEN = ('mmengine', 'mmcv', 'mmseg', 'mmpretrain', 'torchattacks', 'albumentations',
          'deepspeed', 'cv2', 'sklearn')

SCRIPT = f'''
import sys

for name in {HIDDEN!r}:  # behave as if these packages were not installed
    sys.modules[name] = None
import torch
import robustbn
loaded = sorted(m for m, mod in sys.modules.items() if mod is not None and
                (m.split('.')[0] in {HIDDEN!r} or m.startswith('robustbn.openmmlab')))
assert not loaded, loaded
layer = robustbn.SyncJSBN(6, estimator='classic')
x = torch.randn(4, 6, 3, 3, requires_grad=True)
layer(x).square().sum().backward()
assert torch.isfinite(x.grad).all()
print('ok')
'''


def test_import_robustbn_without_openmmlab():
    out = subprocess.run([sys.executable, '-c', SCRIPT], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == 'ok', out.stderr


def test_public_names():
    for name in robustbn.__all__:
        assert getattr(robustbn, name) is not None
    for cls in (robustbn.JSBN1d, robustbn.JSBN2d, robustbn.JSBN3d, robustbn.SyncJSBN,
                robustbn.GpreBN1d, robustbn.GpreBN2d, robustbn.GpreBN3d, robustbn.SyncGpreBN):
        doc = cls.__doc__
        assert all(part in doc for part in ('Args:', 'Shape:', 'Examples::', cls.__name__))
