"""robustbn in plain PyTorch models (no OpenMMLab): torchvision and timm models converted
with convert_norm equal BatchNorm with estimator='none', and train a step with JS-BN."""
import pytest
import torch
from torch import nn

import robustbn

torchvision = pytest.importorskip('torchvision')
timm = pytest.importorskip('timm')


def _models():
    torch.manual_seed(0)
    return {
        'torchvision_resnet18': torchvision.models.resnet18(num_classes=10),
        'timm_resnet18': timm.create_model('resnet18', pretrained=False, num_classes=10),
        # BatchNorm1d after a linear layer, BatchNorm2d after convolutions
        'mixed': nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                               nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16),
                               nn.BatchNorm1d(16), nn.Linear(16, 10)),
    }


def _bn_layers(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize('name', list(_models()))
def test_estimator_none_equals_batchnorm_and_jsbn_trains(name):
    model = _models()[name].double()
    for bn in _bn_layers(model):  # non-trivial running statistics and affine parameters
        with torch.no_grad():
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    ref = _models()[name].double()
    ref.load_state_dict(model.state_dict())
    n_bn = len(_bn_layers(model))
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)

    conv = robustbn.convert_norm(model, 'JSBN', estimator='none')
    assert sum(isinstance(m, robustbn.JSBatchNorm) for m in conv.modules()) == n_bn
    assert conv.state_dict().keys() == ref.state_dict().keys()  # checkpoints stay loadable
    for train in (True, False):
        conv.train(train), ref.train(train)
        torch.testing.assert_close(conv(x), ref(x), rtol=1e-10, atol=1e-10)
    for a, b in zip(conv.state_dict().values(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)  # running stats too

    # JS-BN ('paper') trains: finite loss, every affine parameter gets a gradient, the
    # running statistics move.
    model = robustbn.convert_norm(_models()[name], 'SyncJSBN', estimator='paper').train()
    before = [m.running_mean.clone() for m in model.modules()
              if isinstance(m, robustbn.SyncJSBN)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)),
                                       torch.tensor([0, 1, 2, 3]))
    loss.backward()
    norms = [m for m in model.modules() if isinstance(m, robustbn.SyncJSBN)]
    assert torch.isfinite(loss) and len(norms) == n_bn
    assert all(m.weight.grad is not None and torch.isfinite(m.weight.grad).all()
               for m in norms)
    opt.step()
    assert all(not torch.equal(m.running_mean, b) for m, b in zip(norms, before))
    robustbn.revert_norm(model)
    assert not any(isinstance(m, robustbn.ShrunkBatchNorm) for m in model.modules())


def test_norm_with_its_own_forward_is_refused_and_model_left_unchanged():
    """timm's BatchNormAct2d fuses an activation into a BatchNorm2d subclass: swapping it
    would silently drop the activation."""
    from timm.layers import BatchNormAct2d
    model = nn.Sequential(nn.BatchNorm2d(4), BatchNormAct2d(4, act_layer=nn.ReLU))
    with pytest.raises(ValueError, match=r"BatchNormAct2d at '1'.*not changed"):
        robustbn.convert_norm(model, 'JSBN')
    assert type(model[0]) is nn.BatchNorm2d and type(model[1]) is BatchNormAct2d
