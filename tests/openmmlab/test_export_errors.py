"""tools/export_deepspeed_checkpoint.py on incomplete DeepSpeed checkpoints: a truncated
model-states or optimizer-states file, a missing rank's ZeRO partition, and a
`last_checkpoint` (mmengine) or `latest` (DeepSpeed) pointer to a checkpoint that is not
there each exit non-zero with a message naming the file (and directory), no traceback.

One real checkpoint (the toy model, ZeRO-2, 2 processes on CPU with gloo, as in
test_deepspeed.py) is made once; every case damages a copy of it.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip('deepspeed')

from helpers import DS_TOY, dist_train, start, write_cfg  # noqa: E402

TAG = 'iter_2.pth'
MODEL = 'mp_rank_00_model_states.pt'
OPTIM1 = 'zero_pp_rank_1_mp_rank_00_optim_states.pt'


@pytest.fixture(scope='module')
def ds_checkpoint(tmp_path_factory) -> Path:
    """A complete DeepSpeed checkpoint directory (ZeRO-2, 2 ranks, after 2 iterations)."""
    d = tmp_path_factory.mktemp('ds_export')
    dist_train(write_cfg(d, DS_TOY), d / 'work', 2, '--cfg-options', 'train_cfg.max_iters=2')
    ckpt = d / 'work' / TAG
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(
        [MODEL, OPTIM1, 'zero_pp_rank_0_mp_rank_00_optim_states.pt'])
    return ckpt


def work_copy(ckpt: Path, work: Path) -> Path:
    """``work`` as a copy of the run's work dir: the checkpoint and its last_checkpoint."""
    shutil.copytree(ckpt, work / TAG)
    (work / 'last_checkpoint').write_text(str(work / TAG))
    return work


def export(path: Path, out: Path):
    """(exit status, stderr) of the export tool on ``path``."""
    proc = start([sys.executable, 'tools/export_deepspeed_checkpoint.py', path, out])
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def assert_fails_naming(path: Path, out: Path, *names: str) -> str:
    """The export of ``path`` fails with a message (its last line of stderr) that holds
    each of ``names``, and no traceback."""
    rc, err = export(path, out)
    assert rc != 0 and not out.exists(), err
    assert 'Traceback' not in err, err
    message = err.strip().splitlines()[-1]
    for name in names:
        assert name in message, (name, err)
    return message


def truncate(path: Path, size) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:size if isinstance(size, int) else int(len(data) * size)])


@pytest.mark.parametrize('name,size,via', [(MODEL, 0, 'work dir'), (MODEL, 0.5, 'checkpoint'),
                                           (OPTIM1, 0, 'checkpoint'), (OPTIM1, 0.5, 'work dir')],
                         ids=['model-empty', 'model-half', 'optim-empty', 'optim-half'])
def test_truncated_file_is_named(ds_checkpoint, tmp_path, name, size, via):
    """An empty file (what gave a raw 'EOFError: Ran out of input') or one cut in half,
    exported through the work dir (its last_checkpoint) or the checkpoint directory."""
    work = work_copy(ds_checkpoint, tmp_path / 'work')
    truncate(work / TAG / name, size)
    path = work if via == 'work dir' else work / TAG
    assert_fails_naming(path, tmp_path / 'out.pth', name, TAG, 'incomplete')


def test_missing_partition_is_named(ds_checkpoint, tmp_path):
    work = work_copy(ds_checkpoint, tmp_path / 'work')
    (work / TAG / OPTIM1).unlink()
    assert_fails_naming(work / TAG, tmp_path / 'out.pth', str(work / TAG), 'rank(s) [1]',
                        'incomplete')


def test_missing_model_states_is_named(ds_checkpoint, tmp_path):
    work = work_copy(ds_checkpoint, tmp_path / 'work')
    (work / TAG / MODEL).unlink()
    assert_fails_naming(work / TAG, tmp_path / 'out.pth', str(work / TAG), 'model_states.pt',
                        'incomplete')


def test_last_checkpoint_to_a_missing_directory(ds_checkpoint, tmp_path):
    work = work_copy(ds_checkpoint, tmp_path / 'work')
    shutil.rmtree(work / TAG)
    assert_fails_naming(work, tmp_path / 'out.pth', str(work / 'last_checkpoint'),
                        str(work / TAG), 'does not exist')


def test_deepspeed_latest_tag(ds_checkpoint, tmp_path):
    """A directory saved by DeepSpeed itself: save_dir/latest names the tag's directory."""
    save_dir = tmp_path / 'ds'
    shutil.copytree(ds_checkpoint, save_dir / 'global_step2')
    (save_dir / 'latest').write_text('global_step4')  # its directory was never written
    assert_fails_naming(save_dir, tmp_path / 'out.pth', str(save_dir / 'latest'),
                        'global_step4', 'does not exist')

    (save_dir / 'latest').write_text('global_step2\n')  # and the complete one exports
    out = tmp_path / 'model.pth'
    rc, err = export(save_dir, out)
    assert rc == 0 and out.is_file(), err
