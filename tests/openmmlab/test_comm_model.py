"""tools/comm_model.py: the synchronized norm layers of FCN-HRNetV2-W18, the alpha-beta model
on hand-computed values, how the bytes per rank grow with W in each mode, the gloo
measurement against the model (2 processes), the output files and bad input."""
import json
import math

import pytest
import torch
from helpers import ROOT, load_tool

from robustbn.comm import Collective

cm = load_tool('comm_model')
FCN = ROOT / 'configs' / 'seg' / 'fcn_hr18_4xb2-40k_cityscapes-512x1024_syncjsbn.py'
NO_SYNC = ROOT / 'configs' / 'cls' / 'resnet9_digits_bn.py'  # plain BN
IC = {ic.name: ic for ic in cm.INTERCONNECTS}
# gloo's TCP transport frames every message: 288 bytes per message measured on Linux
# (torch 2.11); allowed up to this much above the payload the ring model counts
FRAMING_PER_MESSAGE = 320


@pytest.fixture(scope='module')
def fcn_run(tmp_path_factory):
    """The tool on FCN-HRNetV2-W18: model at W = 8 and 64, measured with 2 processes."""
    out = tmp_path_factory.mktemp('comm_model')
    res = cm.main([str(FCN), '--worlds', '8', '64', '--measure', '2', '--repeats', '3',
                   '--out', str(out)])
    return res, out


def test_lists_fcn_hr18_synchronized_layers(fcn_run):
    res, _ = fcn_run
    s = res['layers']
    assert (s['layers'], s['channels'], s['widest']) == (306, 17238, 270)
    assert s['types'] == {'SyncJSBN': 306}
    assert s['widths'] == {18: 96, 36: 86, 64: 10, 72: 74, 144: 34, 256: 5, 270: 1}
    assert {layer['sync_mode'] for layer in res['layer_list']} == {'reduce'}


def test_formulas_on_hand_computed_values():
    """NCCL's LL latencies: base 6.6 (ring) / 6.8 (tree) us, 0.6 us per NVLink step, 2.7 us
    per inter-node ring step, 5.0 us per tree level, 1.0 us floor of a multi-node ring step;
    NVLink 450e3, 200 Gb/s IB 25e3, 400 Gb/s IB 50e3 bytes per us."""
    # one node of 8: 14 NVLink steps, 2 * 7/8 * 8000 bytes at 450 GB/s
    assert cm.ring_all_reduce_us(8000, 8, IC['nvlink'], 8) == pytest.approx(
        6.6 + 14 * 0.6 + 14000 / 450e3)
    # 2 nodes: 30 steps, 4 of them inter-node, 1.0 us each of the other 26
    assert cm.ring_all_reduce_us(8000, 16, IC['ib200'], 8) == pytest.approx(
        6.6 + 26 * 1.0 + 4 * 2.7 + 2 * 15 / 16 * 8000 / 25e3)
    # 512 nodes: chain of 8 inside, 9 tree levels across, both ways; 2 n / B
    assert cm.tree_all_reduce_us(8000, 4096, IC['ib200'], 8) == pytest.approx(
        6.8 + 2 * (7 * 0.6 + 9 * 5.0) + 2 * 8000 / 25e3)
    # 8 nodes: 63 steps, 7 inter-node; (W - 1) n / B
    assert cm.ring_all_gather_us(1000, 64, IC['ib400'], 8) == pytest.approx(
        6.6 + 56 * 1.0 + 7 * 2.7 + 63 * 1000 / 50e3)
    # the faster all-reduce: ring on one node (15.03 < 15.24 us), tree on 512 nodes
    assert cm.collective_us(Collective('all_reduce', 1000, 8, 8), IC['nvlink'], 8)[1] == 'ring'
    assert cm.collective_us(Collective('all_reduce', 1000, 8, 4096), IC['ib200'], 8) == \
        (pytest.approx(cm.tree_all_reduce_us(8000, 4096, IC['ib200'], 8)), 'tree')
    assert cm.ring_bytes(Collective('all_reduce', 1000, 8, 4)) == 12000
    assert cm.ring_bytes(Collective('all_gather', 1000, 8, 4)) == 24000
    assert cm.ring_messages(Collective('all_reduce', 1, 8, 4)) == 6
    assert cm.ring_messages(Collective('all_gather', 1, 8, 4)) == 3


def test_layer_collectives():
    """reduce: 2C + 1 float64 forward; gather and torch's SyncBatchNorm: 2C + 1 values per
    rank in the statistics dtype; backward 2C of them."""
    assert cm.layer_collectives(270, 'reduce', 4) == [Collective('all_reduce', 541, 8, 4),
                                                     Collective('all_reduce', 540, 4, 4)]
    gather = [Collective('all_gather', 541, 4, 4), Collective('all_reduce', 540, 4, 4)]
    assert cm.layer_collectives(270, 'gather', 4) == gather
    assert cm.layer_collectives(270, 'torch', 4) == gather
    assert cm.layer_collectives(270, 'gather', 4, torch.bfloat16) == gather
    assert cm.layer_collectives(270, 'gather', 4, torch.float64) == \
        [Collective('all_gather', 541, 8, 4), Collective('all_reduce', 540, 8, 4)]


def test_reduce_bytes_flat_gather_linear(fcn_run):
    """Per rank and step (ring): reduce 2 (W-1)/W x 416,160 bytes, bounded by twice that;
    gather (W-1) x 139,128 bytes forward, linear in W; equal at W = 4."""
    widths = fcn_run[0]['layers']['widths']
    fwd_reduce, fwd_gather, bwd = (2 * 17238 + 306) * 8, (2 * 17238 + 306) * 4, 2 * 17238 * 4
    assert (fwd_reduce, fwd_gather, bwd) == (278256, 139128, 137904)
    for w in (2, 4, 8, 64, 1024, 4096):
        ring = 2 * (w - 1) / w
        assert cm.step_bytes(widths, 'reduce', w) == pytest.approx(ring * (fwd_reduce + bwd))
        assert cm.step_bytes(widths, 'reduce', w) < 2 * (fwd_reduce + bwd)
        assert cm.step_bytes(widths, 'gather', w) == pytest.approx(
            (w - 1) * fwd_gather + ring * bwd)
    assert cm.step_bytes(widths, 'gather', 4) == pytest.approx(cm.step_bytes(widths, 'reduce', 4))
    assert fcn_run[0]['cut_over']['bytes'] == [2]


def test_modeled_times(fcn_run):
    """Rows for every interconnect, scheme and W (nvlink up to 72 GPUs); on one node (W = 8)
    every collective is a ring, across 8 nodes the reduce mode's all-reduces are trees."""
    rows = {(r['interconnect'], r['scheme'], r['world']): r for r in fcn_run[0]['model']}
    assert set(rows) == {(ic, sc, w) for ic in IC for sc in cm.SCHEMES for w in (8, 64)}
    r8 = rows['ib200', 'reduce', 8]
    assert r8['algos'] == {'all_reduce:ring': 612}
    # 306 layers x 2 all-reduces of 6.6 + 14 x 0.6 us, plus the bytes at 450 GB/s
    assert r8['time_ms'] == pytest.approx(306 * 2 * 15.0e-3, rel=1e-3)
    assert rows['ib200', 'reduce', 64]['algos'] == {'all_reduce:tree': 612}
    assert rows['ib200', 'gather', 64]['algos'] == {'all_gather:ring': 306,
                                                   'all_reduce:tree': 306}
    for ic in IC:
        assert rows[ic, 'torch', 64]['time_ms'] == rows[ic, 'gather', 64]['time_ms']


def test_measured_bytes_match_model_two_processes(fcn_run):
    """2 gloo processes, every width of the model, both modes: the counted payload is the
    model's, and the bytes written to the sockets are the ring model's plus at most
    FRAMING_PER_MESSAGE per message."""
    res = fcn_run[0]
    rows = res['measured']
    assert {(r['channels'], r['mode']) for r in rows} == \
        {(c, m) for c in res['layers']['widths'] for m in ('reduce', 'gather')}
    for r in rows:
        c, w = r['channels'], r['world']
        expected = cm.layer_collectives(c, r['mode'], w)
        assert r['calls'] == [e._asdict() for e in expected]
        assert r['payload'] == sum(e.input_bytes for e in expected)
        fwd = (2 * c + 1) * (8 if r['mode'] == 'reduce' else 4)
        assert r['model'] == fwd + 2 * c * 4  # W = 2: a ring sends each rank's input once
        assert r['messages'] == (4 if r['mode'] == 'reduce' else 3)
        assert 0 <= r['wire'] - r['model'] <= FRAMING_PER_MESSAGE * r['messages'], r
    for t in res['measured_totals']:
        assert 1 < t['ratio'] < 2.5, t  # tiny layers: the framing is most of it on gloo


def test_outputs_written(fcn_run):
    res, out = fcn_run
    files = res['files']
    data = json.loads((out / 'comm_model.json').read_text())
    assert data['layers']['channels'] == 17238 and len(data['layer_list']) == 306
    assert data['latency_us'] == cm.LATENCY_US
    md = (out / 'comm_model.md').read_text()
    assert '| W | nvlink reduce |' in md and '## Measured on gloo' in md
    png = out / 'scaling.png'
    assert files['plot'] == str(png)
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and png.stat().st_size > 20000


@pytest.mark.parametrize('argv, message', [
    ([str(FCN), '--worlds', '1', '8'], 'must be >= 2'),
    ([str(FCN), '--measure', '1'], 'must be >= 2'),
    ([str(ROOT / 'configs' / 'missing.py')], 'does not exist'),
    ([str(NO_SYNC)], 'no synchronized norm layers'),
])
def test_bad_input(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        cm.main(argv + ['--out', str(tmp_path)])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_fast_path_rows():
    """The Triton path's rows per rank: 4096 / C, within 2..64."""
    assert [cm.fast_path_rows(c) for c in (18, 64, 270, 4096)] == \
        [64, 64, math.ceil(4096 / 270), 2]
