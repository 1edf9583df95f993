"""What the synchronized layers send: the forward's collective in 'reduce' mode has the same
size at every world size, in 'gather' mode it grows with it; the merge itself is exact.

Counted twice: the payload handed to torch.distributed (``robustbn.comm.CommCounter``), and
the bytes the process actually wrote to its gloo sockets (``wchar`` of /proc/self/io: gloo's
TCP transport sends with write-family system calls), averaged over repeated forwards.
"""
from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port, gloo_group

from robustbn import SyncJSBN, comm
from robustbn.functional import merge_moments

C = 1024  # payloads of kilobytes: gloo's per-message headers (~300 bytes) stay small
REPEATS = 20
PROC_IO = '/proc/self/io'


def _written() -> int:
    with open(PROC_IO) as f:
        return int(next(line for line in f if line.startswith('wchar:')).split()[1])


def _worker(rank: int, world: int, port: int, out_dir: str):
    torch.set_num_threads(1)
    res = {}
    with gloo_group(rank, world, port, timeout=datetime.timedelta(seconds=60)):
        gen = torch.Generator().manual_seed(rank)
        x = torch.randn(2 + rank, C, 2, 2, generator=gen, requires_grad=True)
        for mode in comm.SYNC_MODES:
            layer = SyncJSBN(C, sync_mode=mode)
            with comm.CommCounter() as counter:
                layer(x).sum().backward()
            res[mode, 'calls'] = counter.calls
            if os.path.exists(PROC_IO):
                with torch.no_grad():
                    layer(x)  # warm-up: connections and buffers set up
                    dist.barrier()
                    before = _written()
                    for _ in range(REPEATS):
                        layer(x)
                    res[mode, 'wire'] = (_written() - before) / REPEATS
                    dist.barrier()
        torch.save(res, os.path.join(out_dir, f'rank{rank}.pt'))


@pytest.fixture(scope='module')
def traffic(tmp_path_factory):
    """{world: [per-rank results]} for 2 and 4 gloo processes."""
    out = {}
    for world in (2, 4):
        d = tmp_path_factory.mktemp(f'comm{world}')
        mp.spawn(_worker, args=(world, free_port(), str(d)), nprocs=world, join=True)
        out[world] = [torch.load(d / f'rank{r}.pt', weights_only=False) for r in range(world)]
    return out


def test_counted_payload_per_mode(traffic):
    """One forward collective and one backward all_reduce; the reduce mode's forward
    payload is 2C + 1 float64 values at both world sizes, the gather mode's output W
    times 2C + 1 float32 values."""
    for world, ranks in traffic.items():
        for res in ranks:
            red, gat = res['reduce', 'calls'], res['gather', 'calls']
            assert [c.op for c in red] == ['all_reduce', 'all_reduce'], red
            assert [c.op for c in gat] == ['all_gather', 'all_reduce'], gat
            assert red[0] == comm.forward_payload(C, 'reduce')._replace(world=world)
            assert gat[0] == comm.forward_payload(C, 'gather')._replace(world=world)
            assert red[0].output_bytes == (2 * C + 1) * 8
            assert gat[0].output_bytes == world * (2 * C + 1) * 4
            assert red[1] == gat[1] == comm.Collective('all_reduce', 2 * C, 4, world)
    received = {w: ranks[0]['reduce', 'calls'][0].output_bytes for w, ranks in traffic.items()}
    assert received[2] == received[4], received


def test_bytes_on_the_wire(traffic):
    """Measured socket writes per rank and forward: the reduce mode stays below twice its
    payload (a ring all-reduce sends 2 (W - 1) / W of it) at 2 and 4 processes, while the
    gather mode sends its rows to every other rank ((W - 1) times them)."""
    if not os.path.exists(PROC_IO):
        pytest.skip('no /proc/self/io on this system')
    reduce_bytes = comm.forward_payload(C, 'reduce').input_bytes
    gather_bytes = comm.forward_payload(C, 'gather').input_bytes
    wire = {w: {m: sum(r[m, 'wire'] for r in ranks) / w for m in comm.SYNC_MODES}
            for w, ranks in traffic.items()}
    for w in wire:
        assert reduce_bytes * 2 * (w - 1) / w <= wire[w]['reduce'] <= 2.5 * reduce_bytes, wire
        assert (w - 1) * gather_bytes <= wire[w]['gather'] <= (w - 1) * gather_bytes * 1.5, wire
    # 2 -> 4 processes: the reduce mode's traffic grows by 1.5x (ring), the gather's 3x
    assert wire[4]['reduce'] / wire[2]['reduce'] < 1.8, wire
    assert wire[4]['gather'] / wire[2]['gather'] > 2.5, wire


def test_reduce_merges_rows_exactly():
    """reduce_moment_rows over one rank equals the centred (Chan) merge of the rows, also
    for float32 data with mean 1e3 and std 0.1 (the float64 sums keep the variance)."""
    gen = torch.Generator().manual_seed(0)
    parts = [1e3 + 0.1 * torch.randn(n, 5, generator=gen, dtype=torch.float64)
             for n in (7, 0, 3, 12)]
    rows = []
    for p in parts:
        p32 = p.float()
        var, mean = (torch.var_mean(p32, 0, correction=0) if len(p)
                     else (torch.zeros(5), torch.zeros(5)))
        rows.append(torch.cat([torch.tensor([float(len(p))]), mean, var * len(p)]))
    rows = torch.stack(rows)
    with gloo_group(0, 1, free_port()):
        got = comm.reduce_moment_rows(rows, dist.group.WORLD)[0]
    x = torch.cat(parts).float().double()
    var, mean = torch.var_mean(x, 0, correction=0)
    assert got[0].item() == len(x)
    torch.testing.assert_close(got[1:6].double(), mean, rtol=3e-7, atol=0)
    torch.testing.assert_close(got[6:].double() / len(x), var, rtol=1e-3, atol=0)
    n, m, v = merge_moments(rows[:, 0].double(), rows[:, 1:6].double(), rows[:, 6:].double())
    torch.testing.assert_close(got[6:].double() / len(x), v, rtol=1e-3, atol=0)


def test_sync_mode_is_checked():
    with pytest.raises(ValueError, match="sync_mode must be one of \\('reduce', 'gather'\\)"):
        SyncJSBN(4, sync_mode='allgather')
    assert "sync_mode='gather'" in repr(SyncJSBN(4, sync_mode='gather'))
