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
import sys
from pathlib import Path

import torch


def parse_args():
    parser = argparse.ArgumentParser(description='DeepSpeed checkpoint -> mmengine .pth')
    parser.add_argument('checkpoint', help='a DeepSpeed checkpoint directory (e.g. '
                        'work_dirs/x/iter_40000.pth) or a work dir with last_checkpoint')
    parser.add_argument('out', nargs='?', help='output file (default: CHECKPOINT_DIR '
                        'without .pth + _model.pth, next to it)')
    return parser.parse_args()


def resolve(path: Path) -> Path:
    """The checkpoint directory: ``path`` itself, or what ``path/last_checkpoint`` names."""
    if (path / 'last_checkpoint').is_file():
        path = Path((path / 'last_checkpoint').read_text().strip())
    if not path.is_dir() or not list(path.glob('*model_states.pt')):
        raise SystemExit(f'{path} is not a DeepSpeed checkpoint directory (no '
                         '*model_states.pt in it); plain .pth checkpoints need no export')
    return path


def load_ds(path: Path) -> dict:
    # DeepSpeed's own checkpoint loader reads these files with weights_only=False: they
    # hold its config objects; the files are the user's own checkpoint.
    return torch.load(path, map_location='cpu', weights_only=False)


def export(ckpt_dir: Path) -> dict:
    model_files = sorted(ckpt_dir.glob('*mp_rank_00_model_states.pt'))
    states = load_ds(model_files[0])
    module = states['module']
    buffers = set(states.get('buffer_names', ()))
    if list(ckpt_dir.glob('*_optim_states.pt')):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        fp32 = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name)
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
