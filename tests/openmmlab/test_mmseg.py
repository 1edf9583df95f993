"""robustbn inside mmsegmentation: JSBN / SyncJSBN as ``norm_cfg`` of mmseg's own
FCN-HRNetV2-W18 base config (``mmseg::_base_/models/fcn_hr18.py``), built through
mmseg's registry and mmcv's ``build_norm_layer``. CPU only; a few small HRNet builds.
"""
import math
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

pytest.importorskip('mmcv._ext', reason='mmseg.models needs the compiled mmcv')

from mmcv.cnn import build_norm_layer  # noqa: E402
from mmcv.cnn.bricks.norm import is_norm  # noqa: E402
from mmengine import Config  # noqa: E402
from mmengine.model import revert_sync_batchnorm  # noqa: E402
from mmengine.optim import OptimWrapper  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402
from mmengine.structures import PixelData  # noqa: E402
from mmengine.utils import import_modules_from_strings  # noqa: E402
from mmseg.registry import MODELS as SEG_MODELS  # noqa: E402
from mmseg.structures import SegDataSample  # noqa: E402
from mmseg.utils import register_all_modules  # noqa: E402

import robustbn  # noqa: E402,F401  (registers JSBN, SyncJSBN, ... with mmengine)
from robustbn import JSBN2d, SyncJSBN  # noqa: E402

register_all_modules(init_default_scope=False)

BASE = 'mmseg::_base_/models/fcn_hr18.py'
NUM_CLASSES = 19
SIZE = 64
EXPECTED_CLASS = {'JSBN': JSBN2d, 'SyncJSBN': SyncJSBN, 'BN': nn.BatchNorm2d}

# A user config inheriting mmseg's base config through the ``mmseg::`` package prefix
# (mmengine resolves it in ``_base_`` to mmseg/.mim/configs/...; Config.fromfile does not
# accept the prefix as the file name itself). mmseg's top-level ``norm_cfg`` variable was
# already substituted into the model dict when the base file was parsed, so the model keys
# are set. ``size`` lets SegDataPreProcessor stack the training batch; ``pretrained=None``
# keeps init_weights offline.
CHILD_CFG = """
_base_ = ['{base}']
custom_imports = dict(imports=['robustbn'], allow_failed_imports=False)
model = dict(
    pretrained=None,
    data_preprocessor=dict(size=({size}, {size}), seg_pad_val=255),
    backbone=dict(norm_cfg=dict(type='{norm}', requires_grad=True)),
    decode_head=dict(norm_cfg=dict(type='{norm}', requires_grad=True)))
"""


def load_cfg(tmp_dir, norm):
    path = tmp_dir / f'fcn_hr18_{norm.lower()}.py'
    path.write_text(CHILD_CFG.format(base=BASE, size=SIZE, norm=norm))
    return Config.fromfile(str(path))


def build_model(tmp_dir, norm):
    cfg = load_cfg(tmp_dir, norm)
    import_modules_from_strings(**cfg.custom_imports)
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmseg'):
        model = SEG_MODELS.build(cfg.model)
    return cfg, model


def norm_layers(model):
    return [(name, m) for name, m in model.named_modules() if is_norm(m)]


def make_batch(n=2, size=SIZE, seed=0):
    g = torch.Generator().manual_seed(seed)
    inputs, samples = [], []
    for _ in range(n):
        inputs.append(torch.randint(0, 256, (3, size, size), generator=g).to(torch.uint8))
        sample = SegDataSample()
        sample.gt_sem_seg = PixelData(
            data=torch.randint(0, NUM_CLASSES, (1, size, size), generator=g))
        sample.set_metainfo(dict(img_shape=(size, size), ori_shape=(size, size)))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


@pytest.fixture(scope='module')
def cfg_dir(tmp_path_factory):
    return tmp_path_factory.mktemp('cfgs')


@pytest.fixture(scope='module')
def bn_model(cfg_dir):
    return build_model(cfg_dir, 'BN')[1]


@pytest.fixture(scope='module', params=['JSBN', 'SyncJSBN'])
def built(request, cfg_dir):
    cfg, model = build_model(cfg_dir, request.param)
    return request.param, cfg, model


# ------------------------------------------------------------------------------ config
@pytest.mark.parametrize('norm', ['JSBN', 'SyncJSBN'])
def test_config_from_mmseg_base(cfg_dir, norm):
    cfg = load_cfg(cfg_dir, norm)
    assert cfg.model.type == 'EncoderDecoder'
    assert cfg.model.backbone.type == 'HRNet'
    assert cfg.model.decode_head.num_classes == NUM_CLASSES
    # Exactly the given dicts: nothing (e.g. a ``_scope_`` key) merged in from the base.
    assert cfg.model.backbone.norm_cfg == dict(type=norm, requires_grad=True)
    assert cfg.model.decode_head.norm_cfg == dict(type=norm, requires_grad=True)
    assert cfg.norm_cfg.type == 'SyncBN'  # the base file's own variable is untouched
    assert cfg.model.data_preprocessor.type == 'SegDataPreProcessor'
    assert tuple(cfg.model.data_preprocessor.size) == (SIZE, SIZE)


# ------------------------------------------------------------------------- the layers
def test_every_norm_layer_is_robustbn(built, bn_model):
    norm, _, model = built
    cls = EXPECTED_CLASS[norm]
    layers = norm_layers(model)
    bn_layers = norm_layers(bn_model)
    assert len(layers) == len(bn_layers) > 300  # fcn_hr18: ~306 norm layers
    assert [n for n, _ in layers] == [n for n, _ in bn_layers]
    wrong = [(n, type(m).__name__) for n, m in layers if type(m) is not cls]
    assert not wrong, wrong[:5]
    # Nothing BN-like slipped through outside is_norm either.
    assert all(type(m) is cls for m in model.modules() if isinstance(m, _BatchNorm))
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    assert all(type(m) is nn.BatchNorm2d for _, m in bn_layers)
    for _, m in layers:
        assert m.weight.requires_grad and m.bias.requires_grad
        assert m.eps == 1e-5 and m.estimator == 'paper'


def test_backbone_stem_names(built):
    norm, _, model = built
    cls = EXPECTED_CLASS[norm]
    backbone = model.backbone
    assert backbone.norm1_name == 'bn1' and backbone.norm2_name == 'bn2'
    assert type(backbone.bn1) is cls and type(backbone.bn2) is cls
    assert backbone.norm1 is backbone.bn1 and backbone.norm2 is backbone.bn2
    assert backbone.bn1.num_features == 64 and backbone.bn2.num_features == 64
    # ConvModule's norm in the head is named 'bn' as well.
    assert type(model.decode_head.convs[0].bn) is cls


def test_bn_state_dict_loads_strict(built, bn_model):
    _, _, model = built
    bn_sd = bn_model.state_dict()
    sd = model.state_dict()
    assert list(sd.keys()) == list(bn_sd.keys())
    for k in sd:
        assert sd[k].shape == bn_sd[k].shape and sd[k].dtype == bn_sd[k].dtype, k
    # The models are shared by the other tests: put their own states back afterwards.
    saved = {k: v.clone() for k, v in sd.items()}
    saved_bn = {k: v.clone() for k, v in bn_sd.items()}
    try:
        # Distinguishable values, so the load is seen to happen.
        new = OrderedDict()
        for i, (k, v) in enumerate(bn_sd.items()):
            if v.is_floating_point():
                v = torch.full_like(v, 0.5 + 1e-3 * (i % 97))
            elif v.dtype == torch.long:
                v = torch.full_like(v, 7)
            new[k] = v
        result = model.load_state_dict(new, strict=True)
        assert not result.missing_keys and not result.unexpected_keys
        for k, v in model.state_dict().items():
            assert torch.equal(v, new[k]), k
        # ... and back into the BN model.
        result = bn_model.load_state_dict(model.state_dict(), strict=True)
        assert not result.missing_keys and not result.unexpected_keys
        # A real BN state (the BN model's initial one) loads as well.
        model.load_state_dict(saved_bn, strict=True)
        for k, v in model.state_dict().items():
            assert torch.equal(v, saved_bn[k]), k
    finally:
        model.load_state_dict(saved, strict=True)
        bn_model.load_state_dict(saved_bn, strict=True)


def test_training_step_trains_norm_affine(built):
    norm, _, model = built
    model.train()
    norms = norm_layers(model)
    batch = make_batch()
    data = model.data_preprocessor(batch, True)
    assert data['inputs'].shape == (2, 3, SIZE, SIZE)
    assert data['data_samples'][0].gt_sem_seg.data.shape == (1, SIZE, SIZE)

    # One mmengine train_step (forward, backward, SGD step). The optimizer zeroes the
    # gradients afterwards, so hooks keep a copy of the norm layers' affine gradients.
    grads, handles = {}, []
    for name, m in norms:
        for pname in ('weight', 'bias'):
            handles.append(getattr(m, pname).register_hook(
                lambda g, key=f'{name}.{pname}': grads.__setitem__(key, g.detach().clone())))
    before = {n: (m.weight.detach().clone(), m.bias.detach().clone(),
                  m.running_mean.clone(), int(m.num_batches_tracked)) for n, m in norms}
    optim = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    try:
        log_vars = model.train_step(batch, optim)
    finally:
        for h in handles:
            h.remove()

    assert 'decode.loss_ce' in log_vars and 'decode.acc_seg' in log_vars
    assert all(math.isfinite(float(v)) for v in log_vars.values()), log_vars
    assert float(log_vars['loss']) > 0

    assert len(grads) == 2 * len(norms), 'some norm parameters got no gradient'
    bad = [k for k, g in grads.items() if not torch.isfinite(g).all()]
    assert not bad, bad[:5]
    zero = [n for n, _ in norms if not grads[f'{n}.weight'].abs().sum() > 0]
    assert not zero, f'zero weight grads: {zero[:5]}'
    nonzero = sum(int((grads[f'{n}.weight'] != 0).sum()) for n, _ in norms)
    total = sum(m.num_features for _, m in norms)
    assert nonzero > 0.9 * total, (nonzero, total)

    # The affine parameters trained and the running statistics moved.
    for n, m in norms:
        w0, b0, rm0, nbt0 = before[n]
        assert not torch.equal(m.weight.detach(), w0), f'{n}.weight did not train'
        assert torch.isfinite(m.weight).all() and torch.isfinite(m.bias).all()
        assert not torch.equal(m.running_mean, rm0), f'{n}.running_mean did not update'
        assert int(m.num_batches_tracked) == nbt0 + 1
    assert sum(not torch.equal(m.bias.detach(), before[n][1]) for n, m in norms) \
        > 0.9 * len(norms)

    # Inference with the running statistics is finite too.
    model.eval()
    try:
        with torch.no_grad():
            out = model(**model.data_preprocessor(make_batch(seed=2), False), mode='tensor')
    finally:
        model.train()
    assert out.shape == (2, NUM_CLASSES, SIZE // 4, SIZE // 4)
    assert torch.isfinite(out).all()


def test_norm_eval_freezes_robustbn(built):
    _, _, model = built
    backbone = model.backbone
    backbone.norm_eval = True
    try:
        model.train()
        bb = [m for m in backbone.modules() if isinstance(m, _BatchNorm)]
        assert bb and all(not m.training for m in bb)
        assert all(m.training for _, m in norm_layers(model.decode_head))
    finally:
        backbone.norm_eval = False
        model.train()
    assert all(m.training for _, m in norm_layers(model))


def test_revert_sync_batchnorm_keeps_robustbn(built):
    norm, _, model = built
    cls = EXPECTED_CLASS[norm]
    ids = {n: id(m) for n, m in norm_layers(model)}
    reverted = revert_sync_batchnorm(model)
    assert reverted is model
    layers = norm_layers(reverted)
    assert len(layers) == len(ids)
    assert all(type(m) is cls for _, m in layers)
    assert {n: id(m) for n, m in layers} == ids  # the very same layer objects


def test_revert_sync_batchnorm_still_reverts_torch_syncbn():
    # The control: revert does act on nn.SyncBatchNorm next to a SyncJSBN.
    seq = nn.Sequential(nn.SyncBatchNorm(4), SyncJSBN(4))
    out = revert_sync_batchnorm(seq)
    assert not isinstance(out[0], nn.SyncBatchNorm) and isinstance(out[0], _BatchNorm)
    assert type(out[1]) is SyncJSBN


# -------------------------------------------------------------------- build_norm_layer
@pytest.fixture(params=[None, 'mmseg', 'mmengine'])
def scope(request, monkeypatch):
    if request.param is None:
        # No DefaultScope at all (as in a script that never set one).
        monkeypatch.setattr(DefaultScope, '_instance_dict', OrderedDict())
        assert DefaultScope.get_current_instance() is None
        yield None
    else:
        with DefaultScope.overwrite_default_scope(request.param):
            assert DefaultScope.get_current_instance().scope_name == request.param
            yield request.param


@pytest.mark.parametrize('norm,cls', [('SyncJSBN', SyncJSBN), ('JSBN', JSBN2d),
                                      ('JSBN2d', JSBN2d)])
def test_build_norm_layer(scope, norm, cls):
    name, layer = build_norm_layer(dict(type=norm, requires_grad=True), 16)
    assert name == 'bn' and type(layer) is cls
    assert layer.num_features == 16 and layer.eps == 1e-5
    assert layer.weight.requires_grad and layer.bias.requires_grad

    name, layer = build_norm_layer(dict(type=norm, requires_grad=True), 8, postfix=1)
    assert name == 'bn1' and type(layer) is cls
    name, _ = build_norm_layer(dict(type=norm), 8, postfix='_x')
    assert name == 'bn_x'

    # Layer arguments pass through; requires_grad=False freezes the affine parameters.
    name, layer = build_norm_layer(
        dict(type=norm, requires_grad=False, momentum=0.05, estimator='classic'), 8, postfix=3)
    assert name == 'bn3' and layer.momentum == 0.05 and layer.estimator == 'classic'
    assert not layer.weight.requires_grad and not layer.bias.requires_grad

    # The built layer runs (SyncJSBN without a process group is JSBN).
    x = torch.randn(4, 16, 5, 5)
    _, layer = build_norm_layer(dict(type=norm, requires_grad=True), 16)
    y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_syncjsbn_equals_jsbn_without_process_group():
    torch.manual_seed(0)
    x = torch.randn(4, 16, 5, 5, requires_grad=True)
    _, sync = build_norm_layer(dict(type='SyncJSBN', requires_grad=True), 16)
    _, local = build_norm_layer(dict(type='JSBN', requires_grad=True), 16)
    y1, y2 = sync(x), local(x)
    assert torch.allclose(y1, y2)
    assert torch.allclose(sync.running_var, local.running_var)
