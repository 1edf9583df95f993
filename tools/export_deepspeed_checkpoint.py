# Export a plain mmengine checkpoint (.pth with 'state_dict' and 'meta') from a DeepSpeed
# checkpoint written by FlexibleRunner + DeepSpeedStrategy (a directory such as
# work_dirs/x/iter_40000.pth/), for `load_from`, tools/test.py and tools/adv_test.py.
#
# Parameters are the optimizer's float32 master weights, gathered from every rank's ZeRO
# partition (DeepSpeed's zero_to_fp32), not the bf16/fp16 copies the engine computes
# with; buffers (running statistics, num_batches_tracked) are taken as saved, in their
# dtypes. Without ZeRO partitions the saved module state is used as is.
import argparse
import os.path as osp
import pickle
import re
import sys
import zipfile
from pathlib import Path

import torch


def parse_args():
    parser = argparse.ArgumentParser(description='DeepSpeed checkpoint -> mmengine .pth')
    parser.add_argument('checkpoint', help='a DeepSpeed checkpoint directory (e.g. '
                        'work_dirs/x/iter_40000.pth) or a work dir with last_checkpoint')
    parser.add_argument('out', nargs='?', help='output file (default: CHECKPOINT_DIR '
                        'without .pth + _model.pth, next to it)')
    return parser.parse_args()


class Incomplete(SystemExit):
    """An incomplete or unreadable checkpoint: its message, no traceback, exit status 1."""


def _pointer(path: Path, name: str, target_of) -> Path:
    """What ``path/name`` (a file holding a checkpoint path or tag) points to."""
    pointer = path / name
    try:
        text = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise Incomplete(f'cannot read {pointer}: {e}') from None
    if not text:
        raise Incomplete(f'{pointer} is empty: the checkpoint it should name was not '
                         'recorded (an interrupted save?)')
    target = target_of(text)
    if not target.exists():
        raise Incomplete(f'{pointer} points to {target}, which does not exist: an '
                         'incomplete, moved or deleted checkpoint')
    return target


def resolve(path: Path) -> Path:
    """The checkpoint directory: ``path`` itself, what ``path/last_checkpoint`` (mmengine's
    work dir) names, or ``path/<tag>`` for the tag in ``path/latest`` (DeepSpeed's own
    ``save_checkpoint``)."""
    if not path.exists():
        raise SystemExit(f'{path} does not exist')
    if (path / 'last_checkpoint').is_file():
        path = _pointer(path, 'last_checkpoint', Path)
    elif (path / 'latest').is_file() and not list(path.glob('*model_states.pt')):
        path = _pointer(path, 'latest', lambda tag: path / tag)
    if path.is_dir() and not list(path.glob('*model_states.pt')) \
            and list(path.glob('*optim_states.pt')):
        raise Incomplete(f'{path} is an incomplete DeepSpeed checkpoint: it has ZeRO '
                         'partitions (*optim_states.pt) but no *model_states.pt')
    if not path.is_dir() or not list(path.glob('*model_states.pt')):
        raise SystemExit(f'{path} is not a DeepSpeed checkpoint directory (no '
                         '*model_states.pt in it); plain .pth checkpoints need no export')
    return path


def load_ds(path: Path, mmap: bool = False) -> dict:
    """One file of the checkpoint; an incomplete or unreadable one exits with a message
    naming it. DeepSpeed's own checkpoint loader reads these files with
    weights_only=False: they hold its config objects; the files are the user's own
    checkpoint. ``mmap``: tensors are not read (a check that the file is whole)."""
    try:
        return torch.load(path, map_location='cpu', weights_only=False,
                          mmap=mmap and zipfile.is_zipfile(path))  # legacy files: no mmap
    except (EOFError, RuntimeError, OSError, pickle.UnpicklingError, zipfile.BadZipFile,
            ValueError) as e:
        size = f' ({path.stat().st_size} bytes)' if path.exists() else ''
        why = ' '.join(str(e).split())
        why = why if len(why) <= 160 else why[:157] + '...'
        raise Incomplete(
            f'{path.name} in {path.parent} is incomplete or unreadable{size}: '
            f'{type(e).__name__}: {why or "(no message)"}; the save was probably '
            'interrupted (disk full, killed job): export an earlier, complete checkpoint'
        ) from None


def _rank(path: Path):
    m = re.search(r'zero_pp_rank_(\d+)_', path.name)
    return int(m.group(1)) if m else None


def check_partitions(ckpt_dir: Path, model_files: list, optim_files: list, states: dict):
    """Every file of the checkpoint is whole and every rank's ZeRO partition is there."""
    for f in model_files[1:] + optim_files:  # model_files[0] is loaded already
        load_ds(f, mmap=True)
    world = states.get('dp_world_size')
    if optim_files and isinstance(world, int):
        ranks = {_rank(f) for f in optim_files}
        missing = [r for r in range(world) if r not in ranks]
        if missing:
            raise Incomplete(
                f'{ckpt_dir} is an incomplete DeepSpeed checkpoint: it was saved by {world} '
                f'ranks but the ZeRO partition (*zero_pp_rank_<r>_*optim_states.pt) of '
                f'rank(s) {missing} is missing; found {[f.name for f in optim_files]}')


def export(ckpt_dir: Path) -> dict:
    model_files = sorted(ckpt_dir.glob('*mp_rank_00_model_states.pt'))
    optim_files = sorted(ckpt_dir.glob('*_optim_states.pt'))
    states = load_ds(model_files[0])
    if not isinstance(states, dict) or 'module' not in states:
        raise Incomplete(f'{model_files[0]} holds no DeepSpeed model states (no module)')
    check_partitions(ckpt_dir, model_files, optim_files, states)
    module = states['module']
    buffers = set(states.get('buffer_names', ()))
    if optim_files:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        try:
            fp32 = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir.parent),
                                                            tag=ckpt_dir.name)
        except (EOFError, RuntimeError, OSError, pickle.UnpicklingError, ValueError,
                KeyError) as e:
            raise Incomplete(f'cannot gather the ZeRO partitions of {ckpt_dir}: '
                             f'{type(e).__name__}: {e}') from None
        missing = [k for k in module if k not in buffers and k not in fp32]
        if missing:
            raise SystemExit(f'parameters missing from the ZeRO partitions: {missing[:5]}')
        state_dict = {k: (v if k in buffers else fp32[k]) for k, v in module.items()}
    else:
        state_dict = dict(module)
    state_dict = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    meta = dict(states.get('meta') or {})
    meta.update(deepspeed_checkpoint=str(ckpt_dir), deepspeed_version=states.get('ds_version'))
    return dict(meta=meta, state_dict=state_dict)


def main():
    args = parse_args()
    ckpt_dir = resolve(Path(args.checkpoint))
    out = Path(args.out) if args.out else \
        ckpt_dir.parent / (osp.splitext(ckpt_dir.name)[0] + '_model.pth')
    ckpt = export(ckpt_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, out)
    n = sum(v.numel() for v in ckpt['state_dict'].values())
    print(f'wrote {out}: {len(ckpt["state_dict"])} tensors, {n} values, from {ckpt_dir}',
          file=sys.stderr)


if __name__ == '__main__':
    main()
