"""Communication of a model's synchronized norm layers: modeled time per training step at
large world sizes, and the bytes measured on gloo at small ones.

Usage::

    python tools/comm_model.py CONFIG [--worlds 8 16 32 ... 4096] [--gpus-per-node 8]
        [--dtype float32] [--fast-path] [--measure 2 4 8] [--repeats 10]
        [--out DIR] [--plot PNG] [--cfg-options KEY=VALUE ...]

The model of CONFIG is built on CPU (no dataset, no checkpoint) and its synchronized norm
layers listed: robustbn's (``SyncJSBN``, ``SyncGpreBN``: any ``ShrunkBatchNorm`` with
``synchronized``) and torch's ``SyncBatchNorm`` (mmcv's ``SyncBN``). Each layer runs its
own collectives in every training step; the tool prices them for three schemes, whatever
the config itself uses:

- ``reduce``: robustbn's default ``sync_mode``: forward one ``all_reduce`` of 2C + 1 float64
  sums, whose size does not depend on the world size W;
- ``gather``: ``sync_mode='gather'``: forward one ``all_gather`` of 2C + 1 values per rank in
  the statistics dtype (float32, float64 for float64 input);
- ``torch``: ``torch.nn.SyncBatchNorm``: forward one ``all_gather`` of (mean, invstd, count),
  2C + 1 values per rank in the statistics dtype -- the same collective as ``gather``;

and backward one ``all_reduce`` of 2C values in the statistics dtype in all three. Payloads
come from ``robustbn.comm`` (``forward_payload``). ``--fast-path`` prices the Triton GPU
path instead of the reference path: S rows of partials per rank (S from
``robustbn.fast.ops.reduce_config``) in the gather forward and S x 2C values in the backward
all-reduce (the reduce forward sums the rows locally first: still 2C + 1 float64).

The time model (microseconds, n in bytes, every layer a separate blocking collective, no
overlap with compute) is the alpha-beta model with NCCL's own latency constants (its
tuning model, LL protocol, ``LATENCY_US``); nodes of G GPUs (``--gpus-per-node``) joined by
one NIC per GPU, N = W / G nodes, B the bandwidth of the slowest hop:

- ring all-reduce: base + (2(W-1) - s) a_intra + s a_net + 2 (W-1)/W n / B, s = 2N inter-node
  steps (0 on one node);
- tree all-reduce (NCCL's double binary tree across nodes, a chain inside a node):
  base + 2 ((G-1) a_intra + log2(N) a_net) + 2 n / B;
- all-reduce: the faster of the two, as NCCL's tuner picks;
- ring all-gather (NCCL's only all-gather here): base + (W-N) a_intra + (N-1) a_net
  + (W-1) n / B, n the bytes per rank.

Interconnects (``INTERCONNECTS``): ``nvlink`` (all W GPUs in one NVLink domain, up to 72 as
in an NVL72 rack), ``ib200`` and ``ib400`` (NVLink nodes of G GPUs, 200 or 400 Gb/s
InfiniBand per GPU). Bytes per rank and step are those of the ring algorithms (each rank
sends and receives 2 (W-1)/W n per all-reduce, (W-1) n per all-gather; a tree all-reduce
moves about 2 n). See docs/scaling.md for the sources and the discussion.

Measurement (``--measure 2 4 8``): for each W, W gloo processes on 127.0.0.1 (one thread
each) run, for every distinct channel count of the model's synchronized layers, a SyncJSBN
layer of that width in both sync modes, forward and backward on a small input, ``--repeats``
times; per rank the payload handed to torch.distributed (``robustbn.comm.CommCounter``) and
the bytes the process wrote to its sockets (``wchar`` of /proc/self/io; gloo's TCP transport
writes with write-family system calls) are compared with the ring model's bytes sent per
rank. Scaled by each width's layer count they give the model's bytes per step.

Files: ``OUT/comm_model.json``, ``OUT/comm_model.md`` and the plot (``OUT/scaling.png`` or
``--plot``); OUT defaults to work_dirs/comm_model/<config name>.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import socket
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tools'))  # run_common, also when imported as a module
SCHEMES = ('reduce', 'gather', 'torch')
SCHEME_TITLES = {'reduce': "SyncJSBN sync_mode='reduce'", 'gather': "SyncJSBN sync_mode='gather'",
                 'torch': 'torch SyncBatchNorm'}
DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16,
          'float64': torch.float64}
DEFAULT_WORLDS = [2 ** k for k in range(3, 13)]  # 8 .. 4096
PROC_IO = '/proc/self/io'

# NCCL's latency model, LL protocol (the one it picks for messages of a few kB), in us:
# src/graph/tuning.cc of github.com/NVIDIA/nccl (baseLat, hwLat, getNetOverhead).
LATENCY_US = dict(
    base_ring=6.6,     # per call, ring algorithm
    base_tree=6.8,     # per call, tree algorithm
    nvlink=0.6,        # per step over NVLink (ring and tree)
    net_ring=2.7,      # per inter-node step of a ring
    net_tree=5.0,      # per inter-node level of a tree
    net_overhead=1.0,  # floor of every step of a ring that spans nodes (x86 Intel host)
)


class Interconnect(NamedTuple):
    name: str
    label: str
    intra_gbs: float            # GB/s per GPU and direction inside a node (NVLink 4)
    inter_gbs: Optional[float]  # GB/s per GPU (one NIC each) between nodes; None: one domain
    max_world: Optional[int] = None


# H100 SXM: NVLink 4, 900 GB/s bidirectional per GPU = 450 GB/s per direction; InfiniBand
# HDR 200 Gb/s = 25 GB/s and NDR 400 Gb/s = 50 GB/s per direction and NIC.
INTERCONNECTS = (
    Interconnect('nvlink', 'one NVLink domain (450 GB/s)', 450.0, None, 72),
    Interconnect('ib200', 'NVLink nodes + 200 Gb/s IB per GPU', 450.0, 25.0),
    Interconnect('ib400', 'NVLink nodes + 400 Gb/s IB per GPU', 450.0, 50.0),
)


class ToolError(Exception):
    """A bad argument or config: reported as ``error: ...`` (exit status 2)."""


# ----------------------------------------------------------------------------- the layers
def build_model(config: str, cfg_options=None):
    """The model of ``config``, built on CPU as the run tools load the config."""
    from mmengine.registry import MODELS, init_default_scope
    from run_common import load_config

    import robustbn  # noqa: F401  (registers the layers before the norm_cfg check)

    if not Path(config).is_file():
        raise ToolError(f'config {config!r} does not exist')
    try:
        cfg = load_config(config, argparse.Namespace(launcher='none', cfg_options=cfg_options),
                          work_dir=False)
    except ValueError as e:
        raise ToolError(str(e)) from None
    if 'model' not in cfg:
        raise ToolError(f'config {config!r} has no model')
    init_default_scope(cfg.get('default_scope', 'mmengine'))
    try:
        return MODELS.build(cfg.model)
    except Exception as e:
        raise ToolError(f'cannot build the model of {config!r}: {type(e).__name__}: {e}') \
            from None


def sync_norm_layers(model: torch.nn.Module) -> List[dict]:
    """Every synchronized norm layer of ``model``: name, type, channels and sync_mode
    (None for torch's SyncBatchNorm)."""
    from robustbn import ShrunkBatchNorm
    layers = []
    for name, m in model.named_modules():
        if isinstance(m, ShrunkBatchNorm) and m.synchronized:
            layers.append(dict(name=name, type=type(m).__name__, channels=m.num_features,
                               sync_mode=m.sync_mode))
        elif isinstance(m, torch.nn.SyncBatchNorm):
            layers.append(dict(name=name, type=type(m).__name__, channels=m.num_features,
                               sync_mode=None))
    return layers


def layer_summary(layers: List[dict]) -> dict:
    widths = Counter(layer['channels'] for layer in layers)
    return dict(layers=len(layers), channels=sum(layer['channels'] for layer in layers),
                widest=max(widths), types=dict(Counter(layer['type'] for layer in layers)),
                widths={c: widths[c] for c in sorted(widths)})


# ----------------------------------------------------------------------------- payloads
def fast_path_rows(channels: int) -> int:
    """Rows of partials per rank that the synchronized Triton path sends (S)."""
    from robustbn.fast.ops import reduce_config
    return reduce_config((1, channels, 1), False, True, torch.device('cpu')).splits


def layer_collectives(channels: int, scheme: str, world: int, dtype=torch.float32,
                      fast_path: bool = False) -> list:
    """[forward, backward] collectives (robustbn.comm.Collective) of one layer and step."""
    from robustbn import comm
    rows = fast_path_rows(channels) if fast_path and scheme != 'torch' else 1
    mode = 'gather' if scheme == 'torch' else scheme
    fwd = comm.forward_payload(channels, mode, dtype, rows)
    stat = comm.forward_payload(channels, 'gather', dtype).itemsize  # the statistics dtype
    bwd = comm.Collective('all_reduce', rows * 2 * channels, stat, 1)
    return [fwd._replace(world=world), bwd._replace(world=world)]


def ring_messages(c) -> int:
    """Messages one rank sends in a ring implementation of collective ``c``."""
    return (2 if c.op == 'all_reduce' else 1) * (c.world - 1)


def ring_bytes(c) -> float:
    """Bytes one rank sends (and receives) in a ring implementation of collective ``c``."""
    w = c.world
    if c.op == 'all_reduce':
        return 2 * (w - 1) / w * c.input_bytes
    return (w - 1) * c.input_bytes


# ----------------------------------------------------------------------------- time model
def topology(world: int, ic: Interconnect, gpus_per_node: int):
    """(nodes N, GPUs per node G, bandwidth of the slowest hop in bytes per us)."""
    if ic.inter_gbs is None or world <= gpus_per_node:
        return 1, world, ic.intra_gbs * 1e3
    return math.ceil(world / gpus_per_node), gpus_per_node, ic.inter_gbs * 1e3


def ring_all_reduce_us(n: float, world: int, ic: Interconnect, gpus_per_node: int) -> float:
    nodes, _, bw = topology(world, ic, gpus_per_node)
    lat = LATENCY_US
    steps, inter = 2 * (world - 1), (2 * nodes if nodes > 1 else 0)
    intra = lat['nvlink'] if nodes == 1 else max(lat['nvlink'], lat['net_overhead'])
    return (lat['base_ring'] + (steps - inter) * intra + inter * lat['net_ring']
            + 2 * (world - 1) / world * n / bw)


def tree_all_reduce_us(n: float, world: int, ic: Interconnect, gpus_per_node: int) -> float:
    nodes, per_node, bw = topology(world, ic, gpus_per_node)
    lat = LATENCY_US
    return (lat['base_tree'] + 2 * ((per_node - 1) * lat['nvlink']
                                    + math.log2(nodes) * lat['net_tree']) + 2 * n / bw)


def ring_all_gather_us(n: float, world: int, ic: Interconnect, gpus_per_node: int) -> float:
    nodes, _, bw = topology(world, ic, gpus_per_node)
    lat = LATENCY_US
    intra = lat['nvlink'] if nodes == 1 else max(lat['nvlink'], lat['net_overhead'])
    return (lat['base_ring'] + (world - nodes) * intra + (nodes - 1) * lat['net_ring']
            + (world - 1) * n / bw)


def collective_us(c, ic: Interconnect, gpus_per_node: int):
    """(modeled time in us, algorithm) of collective ``c``."""
    if c.op == 'all_gather':
        return ring_all_gather_us(c.input_bytes, c.world, ic, gpus_per_node), 'ring'
    ring = ring_all_reduce_us(c.input_bytes, c.world, ic, gpus_per_node)
    tree = tree_all_reduce_us(c.input_bytes, c.world, ic, gpus_per_node)
    return (ring, 'ring') if ring <= tree else (tree, 'tree')


def step_model(widths: Dict[int, int], scheme: str, world: int, ic: Interconnect,
               gpus_per_node: int = 8, dtype=torch.float32, fast_path: bool = False) -> dict:
    """One training step (forward + backward of every layer) of layers with ``widths``
    ({channels: number of layers}): modeled time, bytes per rank (ring) and the
    all-reduce algorithms chosen."""
    time_us = fwd_us = sent = 0.0
    algos = Counter()
    for channels, count in widths.items():
        for i, c in enumerate(layer_collectives(channels, scheme, world, dtype, fast_path)):
            t, algo = collective_us(c, ic, gpus_per_node)
            time_us += count * t
            fwd_us += count * t if i == 0 else 0.0
            sent += count * ring_bytes(c)
            algos[f'{c.op}:{algo}'] += count
    return dict(time_ms=time_us / 1e3, forward_ms=fwd_us / 1e3, bytes=sent, algos=dict(algos))


def model_table(widths, worlds, gpus_per_node, dtype, fast_path) -> List[dict]:
    rows = []
    for ic in INTERCONNECTS:
        for world in worlds:
            if ic.max_world is not None and world > ic.max_world:
                continue
            for scheme in SCHEMES:
                rows.append(dict(interconnect=ic.name, world=world, scheme=scheme,
                                 **step_model(widths, scheme, world, ic, gpus_per_node, dtype,
                                              fast_path)))
    return rows


def step_bytes(widths, scheme, world, dtype=torch.float32, fast_path=False) -> float:
    """Bytes one rank sends per step (ring algorithms; no interconnect involved)."""
    return sum(count * ring_bytes(c) for channels, count in widths.items()
               for c in layer_collectives(channels, scheme, world, dtype, fast_path))


def cut_over(widths, max_world, gpus_per_node, dtype, fast_path) -> dict:
    """Over W = 2, 4, ... max_world: the W where 'gather' moves fewer bytes per rank than
    'reduce', and per interconnect those where its modeled step time is lower."""
    worlds = [2 ** k for k in range(1, int(math.log2(max_world)) + 1)]
    out = dict(bytes=[w for w in worlds if step_bytes(widths, 'gather', w, dtype, fast_path)
                      < step_bytes(widths, 'reduce', w, dtype, fast_path)])
    for ic in INTERCONNECTS:
        out[ic.name] = [
            w for w in worlds if (ic.max_world is None or w <= ic.max_world) and
            step_model(widths, 'gather', w, ic, gpus_per_node, dtype, fast_path)['time_ms'] <
            step_model(widths, 'reduce', w, ic, gpus_per_node, dtype, fast_path)['time_ms']]
    return out


# ----------------------------------------------------------------------------- measurement
def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _written() -> int:
    with open(PROC_IO) as f:
        return int(next(line for line in f if line.startswith('wchar:')).split()[1])


def _measure_worker(rank: int, world: int, port: int, widths: List[int], repeats: int,
                    out_dir: str):
    import torch.distributed as dist

    from robustbn import SyncJSBN, comm
    torch.set_num_threads(1)  # W processes share the host's cores
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    res = []
    try:
        gen = torch.Generator().manual_seed(rank)
        for channels in widths:
            x = torch.randn(2, channels, 2, 2, generator=gen, requires_grad=True)
            for mode in comm.SYNC_MODES:
                layer = SyncJSBN(channels, sync_mode=mode)
                layer(x).sum().backward()  # warm-up: buffers of this size set up
                dist.barrier()
                with comm.CommCounter() as counter:
                    before = _written()
                    for _ in range(repeats):
                        layer(x).sum().backward()
                    wire = (_written() - before) / repeats
                dist.barrier()
                calls = counter.calls[:len(counter.calls) // repeats]
                res.append(dict(channels=channels, mode=mode, wire=wire,
                                calls=[c._asdict() for c in calls],
                                payload=counter.input_bytes() / repeats,
                                model=sum(ring_bytes(c) for c in counter.calls) / repeats,
                                messages=sum(ring_messages(c) for c in calls)))
    finally:
        dist.destroy_process_group()
    Path(out_dir, f'rank{rank}.json').write_text(json.dumps(res))


def measure(widths: Dict[int, int], worlds: Sequence[int], repeats: int) -> List[dict]:
    """Per world size, channel count and mode: bytes per rank and layer step (forward +
    backward), measured on gloo against the ring model; mean and range over ranks."""
    import torch.multiprocessing as mp
    if not os.path.exists(PROC_IO):
        raise ToolError(f'--measure needs {PROC_IO} (Linux)')
    rows = []
    for world in worlds:
        with tempfile.TemporaryDirectory() as d:
            # fork: the workers inherit the imported modules (spawned ones would import
            # torch, mmengine and robustbn again: seconds each on a busy host)
            mp.start_processes(_measure_worker, nprocs=world, join=True, start_method='fork',
                               args=(world, free_port(), sorted(widths), repeats, d))
            ranks = [json.loads(Path(d, f'rank{r}.json').read_text()) for r in range(world)]
        for i, first in enumerate(ranks[0]):
            wires = [r[i]['wire'] for r in ranks]
            wire = sum(wires) / world
            rows.append(dict(world=world, channels=first['channels'], mode=first['mode'],
                             layers=widths[first['channels']], calls=first['calls'],
                             payload=first['payload'], model=first['model'], wire=wire,
                             wire_min=min(wires), wire_max=max(wires),
                             messages=first['messages'], overhead=wire - first['model'],
                             per_message=(wire - first['model']) / first['messages']))
    return rows


def measured_totals(rows: List[dict]) -> List[dict]:
    """Per world size and mode: the model's layers together (each width times its count)."""
    out = {}
    for r in rows:
        t = out.setdefault((r['world'], r['mode']),
                           dict(world=r['world'], mode=r['mode'], model=0.0, wire=0.0,
                                messages=0))
        t['model'] += r['layers'] * r['model']
        t['wire'] += r['layers'] * r['wire']
        t['messages'] += r['layers'] * r['messages']
    for t in out.values():
        t['ratio'] = t['wire'] / t['model']
        t['per_message'] = (t['wire'] - t['model']) / t['messages']
    return list(out.values())


# ----------------------------------------------------------------------------- outputs
def _kb(b: float) -> str:
    return f'{b / 1e3:,.1f}'


def markdown(res: dict) -> str:
    s = res['layers']
    types = ', '.join(f'{v} {k}' for k, v in s['types'].items())
    path = 'fast (Triton) path' if res['fast_path'] else 'reference path'
    lines = [f"# Norm-layer communication: {res['config']}", '',
             f"`{res['command']}`", '',
             f"{s['layers']} synchronized norm layers ({types}), {s['channels']:,} channels, "
             f"widest {s['widest']}; statistics dtype from {res['dtype']} input; {path}; "
             f"{res['gpus_per_node']} GPUs per node.", '',
             'Channels x layers: ' + ', '.join(f'{c} x {n}' for c, n in s['widths'].items()),
             '', '## Modeled time per training step (ms, forward + backward)', '']
    worlds = sorted({r['world'] for r in res['model']})
    cols = [(ic.name, sc) for ic in INTERCONNECTS for sc in SCHEMES]
    by = {(r['interconnect'], r['scheme'], r['world']): r for r in res['model']}
    lines.append('| W | ' + ' | '.join(f'{ic} {sc}' for ic, sc in cols) + ' |')
    lines.append('|---' * (len(cols) + 1) + '|')
    for w in worlds:
        cells = [f"{by[ic, sc, w]['time_ms']:.2f}" if (ic, sc, w) in by else '-'
                 for ic, sc in cols]
        lines.append(f'| {w} | ' + ' | '.join(cells) + ' |')
    lines += ['', '## Bytes per rank and step (kB sent = received, ring algorithms)', '',
              '| W | ' + ' | '.join(SCHEMES) + ' |', '|---' * (len(SCHEMES) + 1) + '|']
    for w in sorted(res['bytes']):
        lines.append(f'| {w} | ' + ' | '.join(_kb(res['bytes'][w][sc]) for sc in SCHEMES) + ' |')
    co = res['cut_over']
    lines += ['', '## Where gather is cheaper than reduce (W = 2, 4, ...)', '',
              f"- bytes per rank: W in {co['bytes'] or 'none'}"]
    lines += [f"- modeled time, {ic.name}: W in {co[ic.name] or 'none'}" for ic in INTERCONNECTS]
    if res.get('measured'):
        lines += ['', '## Measured on gloo (bytes per rank and layer step, forward + backward)',
                  '', 'payload: handed to torch.distributed; ring model: sent per rank; '
                  'measured: socket writes (mean, min-max over ranks); messages: sent per rank '
                  'by the ring algorithms.', '',
                  '| W | channels | mode | payload | ring model | measured | measured - model |'
                  ' messages | (measured - model) / message |', '|---' * 9 + '|']
        for r in res['measured']:
            lines.append(f"| {r['world']} | {r['channels']} | {r['mode']} | {r['payload']:.0f} | "
                         f"{r['model']:.0f} | {r['wire']:.0f} ({r['wire_min']:.0f}-"
                         f"{r['wire_max']:.0f}) | {r['overhead']:+.0f} | {r['messages']} | "
                         f"{r['per_message']:.0f} |")
        lines += ['', 'All layers of the model (each width times its layer count):', '',
                  '| W | mode | model kB per step | measured kB per step | measured / model | '
                  '(measured - model) / message |', '|---|---|---|---|---|---|']
        for t in res['measured_totals']:
            lines.append(f"| {t['world']} | {t['mode']} | {_kb(t['model'])} | {_kb(t['wire'])} | "
                         f"{t['ratio']:.3f} | {t['per_message']:.0f} |")
    return '\n'.join(lines) + '\n'


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(13, 5))
    colors = dict(nvlink='tab:green', ib200='tab:blue', ib400='tab:red')
    widths = dict(nvlink=1.5, ib200=4.0, ib400=1.5)  # ib200 and ib400 nearly coincide
    styles = dict(reduce=dict(ls='-', marker='o'), gather=dict(ls='--', marker='s'))
    for ic in INTERCONNECTS:
        for sc, style in styles.items():  # torch's SyncBatchNorm: the gather curve
            rows = [r for r in res['model'] if r['interconnect'] == ic.name and r['scheme'] == sc]
            ax_t.plot([r['world'] for r in rows], [r['time_ms'] for r in rows], ms=4,
                      color=colors[ic.name], lw=widths[ic.name], alpha=0.8, **style)
    handles = [Line2D([], [], color=colors[ic.name], lw=widths[ic.name], label=ic.label)
               for ic in INTERCONNECTS]
    handles += [Line2D([], [], color='k', **styles['reduce'], label=SCHEME_TITLES['reduce']),
                Line2D([], [], color='k', **styles['gather'],
                       label=f"{SCHEME_TITLES['gather']} = {SCHEME_TITLES['torch']}")]
    ax_t.legend(handles=handles, fontsize=7.5)
    ax_t.set(xscale='log', yscale='log', xlabel=f"world size W ({res['gpus_per_node']} GPUs "
             'per node)', ylabel='ms per step (model)',
             title='Norm-layer collectives per training step (alpha-beta model)')
    ax_t.set_xscale('log', base=2)
    worlds = sorted(res['bytes'])
    for sc, style in styles.items():
        ax_b.plot(worlds, [res['bytes'][w][sc] for w in worlds], color='k', ms=4, **style,
                  label=f'{SCHEME_TITLES[sc]} (ring model)')
    for sc, marker in (('reduce', 'o'), ('gather', 's')):
        pts = [t for t in res.get('measured_totals', []) if t['mode'] == sc]
        if pts:
            ax_b.plot([t['world'] for t in pts], [t['wire'] for t in pts], marker, ms=9,
                      mfc='none', color='tab:orange',
                      label=f'{sc}, measured on gloo (with its per-message framing)')
    ax_b.set(xscale='log', yscale='log', xlabel='world size W',
             ylabel='bytes sent (= received) per rank and step',
             title='Bytes per rank per step (forward + backward)')
    ax_b.set_xscale('log', base=2)
    ax_b.legend(fontsize=7.5)
    path_name = 'fast (Triton) path' if res['fast_path'] else 'reference path'
    fig.suptitle(f"{Path(res['config']).stem}: {res['layers']['layers']} synchronized norm "
                 f"layers, {res['layers']['channels']:,} channels; {res['dtype']}, {path_name}",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    from mmengine.config import DictAction
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('config', help='the mmengine config of the model')
    p.add_argument('--worlds', type=int, nargs='+', default=DEFAULT_WORLDS,
                   help='world sizes to model (default 8 16 ... 4096)')
    p.add_argument('--gpus-per-node', type=int, default=8)
    p.add_argument('--dtype', choices=sorted(DTYPES), default='float32',
                   help='the layers\' input dtype (sets the statistics dtype)')
    p.add_argument('--fast-path', action='store_true',
                   help='price the Triton GPU path (S rows of partials) instead')
    p.add_argument('--measure', type=int, nargs='+', default=[],
                   help='world sizes to measure with local gloo processes, e.g. 2 4 8')
    p.add_argument('--repeats', type=int, default=10, help='measured steps per layer')
    p.add_argument('--out', type=Path, default=None,
                   help='output folder (default work_dirs/comm_model/<config name>)')
    p.add_argument('--plot', type=Path, default=None, help='the PNG (default OUT/scaling.png)')
    p.add_argument('--cfg-options', nargs='+', action=DictAction)
    return p


def run(args, command: str) -> dict:
    if min(args.worlds) < 2 or (args.measure and min(args.measure) < 2):
        raise ToolError('world sizes (--worlds, --measure) must be >= 2')
    if args.gpus_per_node < 1 or args.repeats < 1:
        raise ToolError('--gpus-per-node and --repeats must be >= 1')
    layers = sync_norm_layers(build_model(args.config, args.cfg_options))
    if not layers:
        raise ToolError(f'{args.config}: the model has no synchronized norm layers (SyncJSBN, '
                        'SyncGpreBN or torch SyncBatchNorm); nothing is communicated (to price '
                        'a local model synchronized: --cfg-options '
                        'model.backbone.norm_cfg.type=SyncJSBN)')
    summary = layer_summary(layers)
    widths, dtype = summary['widths'], DTYPES[args.dtype]
    worlds = sorted(set(args.worlds))
    res = dict(config=args.config, command=command, dtype=args.dtype,
               fast_path=args.fast_path, gpus_per_node=args.gpus_per_node,
               layers=summary, layer_list=layers, latency_us=LATENCY_US,
               interconnects=[ic._asdict() for ic in INTERCONNECTS],
               model=model_table(widths, worlds, args.gpus_per_node, dtype, args.fast_path))
    res['bytes'] = {w: {sc: step_bytes(widths, sc, w, dtype, args.fast_path) for sc in SCHEMES}
                    for w in sorted(set(worlds) | set(args.measure))}
    res['cut_over'] = cut_over(widths, max(worlds), args.gpus_per_node, dtype, args.fast_path)
    if args.measure:
        res['measured'] = measure(widths, sorted(set(args.measure)), args.repeats)
        res['measured_totals'] = measured_totals(res['measured'])
    return res


def write_outputs(res: dict, out: Path, png: Optional[Path]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    png = png or out / 'scaling.png'
    res['files'] = dict(json=str(out / 'comm_model.json'), markdown=str(out / 'comm_model.md'),
                        plot=str(png))
    (out / 'comm_model.json').write_text(json.dumps(res, indent=1) + '\n')
    (out / 'comm_model.md').write_text(markdown(res))
    plot(res, png)
    return res['files']


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = 'python tools/comm_model.py ' + ' '.join(sys.argv[1:] if argv is None else argv)
    try:
        res = run(args, command)
    except ToolError as e:
        parser.error(str(e))
    files = write_outputs(res, args.out or ROOT / 'work_dirs' / 'comm_model' /
                          Path(args.config).stem, args.plot)
    print(markdown(res))
    print('wrote ' + ', '.join(files.values()))
    return res


if __name__ == '__main__':
    main()
