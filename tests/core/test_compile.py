"""torch.compile of models with the layers on the default (non-fast) path, CPU: one graph
(fullgraph=True), and the same outputs, gradients and buffers as eager over several steps.

``aot_eager_decomp_partition`` runs AOTAutograd with the min-cut partitioner that inductor
uses (it may recompute forward values in the backward) without generating code; one test
runs inductor itself where a C++ compiler is available."""
import copy
import shutil

import pytest
import torch
from torch import nn

import robustbn

ESTIMATORS = sorted(robustbn.ESTIMATORS)
GPREBN_VARIANTS = {
    'default': {},
    'std_average_half_theta': dict(target_average='std', theta=0.5),
    'source_init_updates_source': dict(target_init='source', update_source_stats=True),
}


def _model(layer: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3), layer, nn.ReLU(), nn.Conv2d(6, 2, 1))


def _assert_compiled_equals_eager(model: nn.Module, backend: str, bf16: bool = False,
                                  steps: int = 3) -> None:
    torch._dynamo.reset()
    eager, compiled = model, copy.deepcopy(model)
    call = torch.compile(compiled, backend=backend, fullgraph=True)
    tol = dict(rtol=2e-2, atol=2e-2) if bf16 else dict(rtol=1e-4, atol=1e-5)
    for step in range(steps):
        x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(step)) * (1 + step)
        results = []
        for m, fn in ((eager, eager), (compiled, call)):
            m.zero_grad(set_to_none=True)
            with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
                y = fn(x + 0.5)
            y.float().square().mean().backward()
            results.append((y.float(), [p.grad for p in m.parameters()], list(m.buffers())))
        (ye, ge, be), (yc, gc, bc) = results
        torch.testing.assert_close(yc, ye, **tol, msg=f'output, step {step}')
        for i, (a, b) in enumerate(zip(gc, ge)):
            torch.testing.assert_close(a, b, **tol, msg=f'gradient {i}, step {step}')
        for i, (a, b) in enumerate(zip(bc, be)):
            torch.testing.assert_close(a, b, **tol, msg=f'buffer {i}, step {step}')


@pytest.mark.parametrize('bf16', [False, True], ids=['fp32', 'bf16'])
@pytest.mark.parametrize('est', ESTIMATORS)
def test_jsbn_compiles_to_one_graph_equal_to_eager(est, bf16):
    _assert_compiled_equals_eager(_model(robustbn.JSBN2d(6, estimator=est)),
                                  'aot_eager_decomp_partition', bf16)


@pytest.mark.parametrize('bf16', [False, True], ids=['fp32', 'bf16'])
@pytest.mark.parametrize('variant', sorted(GPREBN_VARIANTS))
def test_gprebn_compiles_to_one_graph_equal_to_eager(variant, bf16):
    """The backward needs the dataset statistics that the forward read from the averages
    it then updates: the partitioner must not recompute them from the updated buffers
    (it did, giving wrong gradients from the second step on)."""
    model = robustbn.convert_norm(_model(nn.BatchNorm2d(6)), 'GpreBN',
                                  batch_estimator='paper', **GPREBN_VARIANTS[variant])
    _assert_compiled_equals_eager(model, 'aot_eager_decomp_partition', bf16)


def test_gprebn_resumed_from_a_checkpoint_compiles_to_one_graph():
    """A loaded checkpoint tells the layer whether its average is initialized, so the
    compiled forward needs no data-dependent branch on the flag (a fresh layer reads the
    flag once, a graph break)."""
    trained = _model(robustbn.GpreBN2d(6))
    trained(torch.randn(4, 3, 8, 8))  # the first batch initializes the average
    resumed = _model(robustbn.GpreBN2d(6))
    resumed.load_state_dict(trained.state_dict())
    assert resumed[1]._initialized is True
    _assert_compiled_equals_eager(resumed, 'aot_eager_decomp_partition', steps=2)
    fresh = _model(robustbn.GpreBN2d(6))
    fresh.load_state_dict(_model(nn.BatchNorm2d(6)).state_dict())  # a BN checkpoint
    assert fresh[1]._initialized is False
    _assert_compiled_equals_eager(fresh, 'aot_eager_decomp_partition', steps=2)


@pytest.mark.skipif(shutil.which('g++') is None and shutil.which('c++') is None,
                    reason='inductor on CPU needs a C++ compiler')
def test_inductor_compiled_layers_equal_eager():
    gprebn = robustbn.convert_norm(nn.BatchNorm2d(6), 'GpreBN', theta=0.5)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), robustbn.JSBN2d(6, estimator='classic'),
                          nn.ReLU(), nn.Conv2d(6, 6, 1), gprebn, nn.ReLU(), nn.Conv2d(6, 2, 1))
    _assert_compiled_equals_eager(model, 'inductor')
