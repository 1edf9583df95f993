"""Compile the fast path's Triton kernels for a GPU target without a GPU.

Triton's interpreter (fast_path_cases.py) runs the kernels as Python and accepts code the
compiler rejects; this compiles the launches the fast path makes (captured from its host
code, not run) for sm_90 with Triton's bundled ptxas, and reports register spills of the
kernels that stream the full tensor. Run as a script (tests/core/test_fast_path.py does):
prints one JSON object {variant: null or the failure}.
"""
from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import torch

TARGET = ('cuda', 90, 32)
VERBOSE = False
STREAMING = ('moments_kernel', 'grad_sums_kernel', 'channel_affine_kernel')
TRITON_TYPES = {torch.float32: 'fp32', torch.float64: 'fp64', torch.bfloat16: 'bf16',
                torch.float16: 'fp16'}

# (name, input shape, dtype, channels last, estimator, GpreBN reference statistics,
#  running-statistics updates, synchronized)
VARIANTS = [
    ('hrnet_nchw_f32_paper', (2, 18, 32, 64), torch.float32, False, 'paper', False, 1, False),
    ('hrnet_nchw_bf16_classic', (2, 18, 32, 64), torch.bfloat16, False, 'classic', False, 1,
     False),
    ('resnet_cl_f16_wacv', (8, 256, 7, 7), torch.float16, True, 'wacv', False, 1, False),
    ('wide_nchw_f32_paper_mean', (2, 2048, 7, 7), torch.float32, False, 'paper_mean', False,
     1, False),
    ('widest_cl_f32_classic', (2, 8192, 1, 1), torch.float32, True, 'classic', False, 1,
     False),
    ('input_2d_f32_none', (16, 64), torch.float32, True, 'none', False, 0, False),
    ('gprebn_nchw_f32_paper', (2, 18, 8, 8), torch.float32, False, 'paper', True, 2, False),
    ('sync_nchw_f32_paper', (2, 18, 8, 8), torch.float32, False, 'paper', False, 1, True),
    ('sync_cl_bf16_paper', (2, 64, 8, 8), torch.bfloat16, True, 'paper', False, 1, True),
    ('float64_nchw_classic', (2, 6, 4, 4), torch.float64, False, 'classic', True, 2, False),
    # offsets in int64 (taken from 2^31 elements on; forced here on a small input)
    ('int64_offsets_nchw_bf16', (2, 18, 8, 8), torch.bfloat16, False, 'paper', False, 1, False),
    ('int64_offsets_cl_f32', (2, 18, 8, 8), torch.float32, True, 'paper', False, 1, False),
    # affine=False (no weight, bias or their gradients); an input without gradient
    ('no_affine_nchw_f32_wacv', (2, 18, 8, 8), torch.float32, False, 'wacv', False, 1, False),
    ('no_input_grad_cl_f32_paper', (2, 18, 8, 8), torch.float32, True, 'paper', False, 1,
     True),
]


class Launch:
    """Stands in for a JITFunction: records [grid](*args, **kwargs) instead of running."""

    def __init__(self, fn, log):
        self.fn, self.log = fn, log

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.log.append((self.fn, args, kwargs))
        return record


def _signature(fn, args, kwargs):
    """Triton signature and constants as the JIT would specialize this call (ints equal
    to 1 become constants unless the kernel says not to specialize on them)."""
    sig, consts = {}, {}
    values = dict(zip(fn.arg_names, args))
    values.update({k: v for k, v in kwargs.items() if k in fn.arg_names})
    for p in fn.params:
        v = values[p.name]
        if p.is_constexpr:
            sig[p.name], consts[p.name] = 'constexpr', v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = '*' + TRITON_TYPES[v.dtype]
        elif isinstance(v, bool):
            sig[p.name], consts[p.name] = 'constexpr', v
        elif isinstance(v, int):
            if v == 1 and not p.do_not_specialize:
                sig[p.name], consts[p.name] = 'constexpr', 1
            else:
                sig[p.name] = 'i32' if -2 ** 31 <= v < 2 ** 31 else 'i64'
        else:
            sig[p.name] = p.annotation_type or 'fp32'
    return sig, consts


def _stack_bytes(cubin: bytes) -> int:
    import triton
    tool = Path(triton.__file__).parent / 'backends' / 'nvidia' / 'bin' / 'cuobjdump'
    with tempfile.NamedTemporaryFile(suffix='.cubin') as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), '-res-usage', f.name], capture_output=True,
                             text=True, check=True).stdout
    return int(re.search(r'STACK:(\d+)', out).group(1))


@contextlib.contextmanager
def _captured(log, int64=False):
    """Kernels recorded, not launched; collectives of a one-rank group."""
    from robustbn.fast import kernels as K
    from robustbn.fast import ops
    from robustbn.fast import vector_kernels as V
    saved = {}
    for mod, names in ((K, STREAMING), (V, ('estimate_kernel', 'vjp_kernel'))):
        for name in names:
            saved[mod, name] = getattr(mod, name)
            setattr(mod, name, Launch(getattr(mod, name), log))
    saved_int64 = ops._int64
    if int64:
        ops._int64 = lambda x: True
    import torch.distributed as dist
    saved_dist = dist.get_world_size, dist.all_gather_into_tensor, dist.all_reduce
    dist.get_world_size = lambda group=None: 1
    dist.all_gather_into_tensor = lambda out, inp, group=None: out.copy_(inp)
    dist.all_reduce = lambda t, group=None: t
    try:
        yield
    finally:
        for (mod, name), fn in saved.items():
            setattr(mod, name, fn)
        dist.get_world_size, dist.all_gather_into_tensor, dist.all_reduce = saved_dist
        ops._int64 = saved_int64


def launches(shape, dtype, cl, estimator, ref, n_updates, synced, int64=False, affine=True,
             input_grad=True):
    """The kernel launches of one forward and one backward."""
    from robustbn.fast import ops
    c = shape[1]
    x = torch.zeros(shape, dtype=dtype)
    if cl:
        x = x.permute(0, *range(2, x.dim()), 1).contiguous().permute(
            0, x.dim() - 1, *range(1, x.dim() - 1))
    w, b = (torch.ones(c), torch.zeros(c)) if affine else (None, None)
    updates = [(torch.zeros(c), torch.ones(c), 0.1)] * n_updates
    ref_mu, ref_var = (torch.zeros(c), torch.ones(c)) if ref else (None, None)
    group = object() if synced else None
    log = []
    with _captured(log, int64):
        _, stats = ops.forward_impl(x, w, b, estimator, 1e-5, group, updates, ref_mu, ref_var)
        ops.backward_impl(torch.zeros_like(x), x, w, stats, estimator, 1e-5, group, ref,
                          input_grad, affine, affine, torch.float32)
    return log


def compile_variant(variant):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    name, shape, dtype, cl, est, ref, n_upd, synced = variant
    problems = []
    for fn, args, kwargs in launches(shape, dtype, cl, est, ref, n_upd, synced,
                                     int64=name.startswith('int64'),
                                     affine=not name.startswith('no_affine'),
                                     input_grad=not name.startswith('no_input_grad')):
        sig, consts = _signature(fn, args, kwargs)
        kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                                target=GPUTarget(*TARGET),
                                options=dict(num_warps=kwargs.get('num_warps', 4)))
        stack = _stack_bytes(kernel.asm['cubin'])
        if VERBOSE:
            print(name, fn.__name__, {k: v for k, v in consts.items() if k.isupper()},
                  f'stack {stack}', file=sys.stderr)
        if fn.__name__ in STREAMING:
            if stack:
                problems.append(f'{fn.__name__} {consts}: {stack} bytes of stack (spills)')
    assert not problems, '; '.join(problems)


def main(names):
    results = {}
    for variant in VARIANTS:
        if names and variant[0] not in names:
            continue
        try:
            compile_variant(variant)
            results[variant[0]] = None
        except Exception:  # reported per variant by the parent test
            results[variant[0]] = traceback.format_exc(limit=3)
    print(json.dumps(results))


if __name__ == '__main__':
    VERBOSE = '-v' in sys.argv
    main([a for a in sys.argv[1:] if a != '-v'])
