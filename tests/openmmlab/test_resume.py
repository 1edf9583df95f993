"""`tools/train.py --resume` after a torn checkpoint save (robustbn.openmmlab.resume).

mmengine's CheckpointHook with max_keep_ckpts=1 deletes checkpoint k before it writes
checkpoint k+1 and rewrites last_checkpoint only after the write: a run killed mid-write
leaves last_checkpoint naming the deleted file. The end-to-end test kills a real training
process (tools/train.py, a slow storage backend from resume_components.py widening the
write) in that window and resumes; the unit tests run the finder on hand-made work dirs.
"""
from __future__ import annotations

import os
import signal
import time
import zipfile

import pytest
import torch
from helpers import TIMEOUT, run, start, train_py, write_toy_cfg
from mmengine.config import Config

import robustbn  # noqa: F401  (mmengine checkpoints load under torch's weights_only)
from robustbn.openmmlab import resume
from robustbn.openmmlab.resume import (
    checkpoint_problem,
    find_resume_checkpoint,
    resolve_resume,
)


# ----------------------------------------------------------------------------- work dirs
def save_ckpt(path, step: int):
    torch.save(dict(meta=dict(iter=step), state_dict=dict(w=torch.full((64,), float(step)))),
               path)
    return str(path)


def truncated(path, step: int, keep: float = 0.5):
    save_ckpt(path, step)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    return str(path)


def point_last_to(work, path):
    (work / 'last_checkpoint').write_text(str(path))


@pytest.fixture
def warnings_seen(monkeypatch):
    """The messages resolve_resume logs."""
    seen = []
    import mmengine.logging
    monkeypatch.setattr(mmengine.logging, 'print_log', lambda msg, **kw: seen.append(msg))
    return seen


def resume_cfg(work, **extra):
    return Config(dict(resume=True, work_dir=str(work), load_from=None, **extra))


# ----------------------------------------------------------------------------- unit tests
def test_checkpoint_problem(tmp_path):
    good = save_ckpt(tmp_path / 'good.pth', 1)
    assert checkpoint_problem(good) is None
    assert checkpoint_problem(str(tmp_path / 'nope.pth')) == 'missing'
    (tmp_path / 'empty.pth').write_bytes(b'')
    assert checkpoint_problem(str(tmp_path / 'empty.pth')) == 'empty'
    assert checkpoint_problem(str(tmp_path)) == 'not a file'
    size = os.path.getsize(good)
    for keep in (0.01, 0.5, (size - 1) / size):  # cut anywhere: the central directory is last
        problem = checkpoint_problem(truncated(tmp_path / f'cut{keep}.pth', 1, keep))
        assert problem is not None and 'truncated' in problem, (keep, problem)
    (tmp_path / 'text.pth').write_text('not a checkpoint')
    assert checkpoint_problem(str(tmp_path / 'text.pth')) == 'not a torch checkpoint'
    with zipfile.ZipFile(tmp_path / 'other.zip', 'w') as z:
        z.writestr('a.txt', 'x')
    assert 'no data.pkl' in checkpoint_problem(str(tmp_path / 'other.zip'))
    legacy = tmp_path / 'legacy.pth'  # torch's pre-1.6 format still counts
    torch.save(dict(w=torch.ones(2)), legacy, _use_new_zipfile_serialization=False)
    assert checkpoint_problem(str(legacy)) is None


def test_missing_named_file_takes_newest_complete(tmp_path, warnings_seen):
    work = tmp_path / 'work'
    work.mkdir()
    save_ckpt(work / 'iter_2.pth', 2)
    iter_4 = save_ckpt(work / 'iter_4.pth', 4)
    truncated(work / 'iter_8.pth', 8)  # the torn write
    save_ckpt(work / 'iter_3.pth.bak', 3)  # other names: not candidates
    save_ckpt(work / 'best_acc_iter_7.pth', 7)
    save_ckpt(work / 'state_rank0.pth', 9)
    point_last_to(work, work / 'iter_6.pth')  # deleted by max_keep_ckpts=1

    point = find_resume_checkpoint(str(work))
    assert point == resume.ResumePoint(str(work / 'iter_6.pth'), 'missing', iter_4)
    cfg = resume_cfg(work)
    resolve_resume(cfg)
    assert cfg.resume is True and cfg.load_from == iter_4
    [msg] = warnings_seen
    assert f"names '{work / 'iter_6.pth'}'" in msg and '(missing)' in msg
    assert f'resuming from {iter_4}' in msg


def test_truncated_named_file_takes_older(tmp_path, warnings_seen):
    work = tmp_path / 'work'
    work.mkdir()
    epoch_9 = save_ckpt(work / 'epoch_9.pth', 9)  # numeric order, not lexicographic
    save_ckpt(work / 'epoch_10.pth.tmp', 10)
    truncated(work / 'epoch_12.pth', 12)
    save_ckpt(work / 'iter_20.pth', 20)  # another template than the named file's
    point_last_to(work, work / 'epoch_12.pth')
    point = find_resume_checkpoint(str(work))
    assert point.checkpoint == epoch_9 and 'truncated' in point.problem
    cfg = resume_cfg(work)
    resolve_resume(cfg)
    assert cfg.load_from == epoch_9 and 'truncated' in warnings_seen[0]


def test_no_complete_checkpoint_starts_from_scratch(tmp_path, warnings_seen):
    """What mmengine's --resume does without last_checkpoint: train from the start."""
    work = tmp_path / 'work'
    work.mkdir()
    truncated(work / 'iter_4.pth', 4)
    point_last_to(work, work / 'iter_2.pth')
    assert find_resume_checkpoint(str(work)).checkpoint is None
    cfg = resume_cfg(work)
    resolve_resume(cfg)
    assert cfg.resume is False and cfg.load_from is None
    assert 'no complete checkpoint' in warnings_seen[0] and 'from scratch' in warnings_seen[0]


def test_moved_work_dir_and_empty_last_checkpoint(tmp_path):
    work = tmp_path / 'work'
    work.mkdir()
    iter_4 = save_ckpt(work / 'iter_4.pth', 4)
    # work dir copied from a cluster: last_checkpoint names the old absolute path
    point_last_to(work, '/gone/cluster/work/iter_4.pth')
    assert find_resume_checkpoint(str(work)).checkpoint == iter_4
    # killed between opening last_checkpoint and writing it
    (work / 'last_checkpoint').write_text('')
    point = find_resume_checkpoint(str(work))
    assert (point.checkpoint, point.problem) == (iter_4, 'empty last_checkpoint')


def test_left_to_mmengine(tmp_path, warnings_seen):
    work = tmp_path / 'work'
    work.mkdir()
    # no last_checkpoint: mmengine starts from scratch itself
    assert find_resume_checkpoint(str(work)) == resume.ResumePoint(None, None, None)
    cfg = resume_cfg(work)
    assert resolve_resume(cfg) is None and cfg.resume is True and cfg.load_from is None
    # a complete named file
    good = save_ckpt(work / 'iter_2.pth', 2)
    point_last_to(work, good)
    assert find_resume_checkpoint(str(work)) == resume.ResumePoint(good, None, good)
    assert resolve_resume(cfg) is None and cfg.load_from is None
    # a broken named file, but no --resume / an explicit load_from / a DeepSpeed config
    point_last_to(work, work / 'iter_6.pth')
    deepspeed = dict(runner_type='FlexibleRunner', strategy=dict(type='DeepSpeedStrategy'))
    for cfg in (Config(dict(resume=False, work_dir=str(work))),
                Config(dict(resume=True, work_dir=str(work), load_from=good)),
                resume_cfg(work, **deepspeed)):
        before = cfg.to_dict()
        assert resolve_resume(cfg) is None and cfg.to_dict() == before
    # a DeepSpeed checkpoint directory or a remote path in last_checkpoint
    (work / 'iter_8.pth').mkdir()
    point_last_to(work, work / 'iter_8.pth')
    assert find_resume_checkpoint(str(work)).problem is None
    point_last_to(work, 's3://bucket/work/iter_6.pth')
    assert find_resume_checkpoint(str(work)).problem is None
    assert warnings_seen == []


# ----------------------------------------------------------------------------- end to end
SLOW_CFG = """
custom_imports = dict(imports=['robustbn', 'toy_components', 'resume_components'],
                      allow_failed_imports=False)
default_hooks = dict(logger=dict(type='LoggerHook', interval=1),
                     checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=2,
                                     backend_args=dict(backend='slow_local', delay=0)))
"""


def wait_for_write(proc, path, timeout=TIMEOUT):
    """Until ``path`` exists with some bytes in it (the slow write has begun)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and path.stat().st_size > 0:
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f'training ended ({proc.returncode}) before {path.name} was '
                        f'written\n{out[-3000:]}\n{err[-6000:]}')
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f'{path} did not appear within {timeout} s')


def test_resume_after_kill_during_checkpoint_write(tmp_path):
    cfg = write_toy_cfg(tmp_path, SLOW_CFG)
    work = tmp_path / 'work'
    # An earlier run of the job: complete iter_2 and iter_4 (no max_keep_ckpts then).
    run(train_py(cfg, work))
    assert {p.name for p in work.glob('iter_*.pth')} == {'iter_2.pth', 'iter_4.pth'}

    # Resumed with a longer schedule and max_keep_ckpts=1: it saves iter_6, then deletes
    # iter_6 and writes iter_8 slowly (4 flushed pieces, 0.5 s apart) -- killed mid-write.
    longer = ['--cfg-options', 'train_cfg.max_iters=8', 'default_hooks.checkpoint.max_keep_ckpts=1']
    proc = start(train_py(cfg, work, '--resume', *longer,
                          'default_hooks.checkpoint.backend_args.delay=0.5'))
    wait_for_write(proc, work / 'iter_8.pth')
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL

    named = (work / 'last_checkpoint').read_text().strip()
    assert named == str(work / 'iter_6.pth') and not os.path.exists(named)
    assert 'truncated' in checkpoint_problem(str(work / 'iter_8.pth'))

    # --resume: the newest complete checkpoint is iter_4; training finishes.
    out = run(train_py(cfg, work, '--resume', *longer))
    assert f"last_checkpoint names '{named}', which cannot be resumed from (missing); " \
           f'resuming from {work / "iter_4.pth"}' in out
    assert 'Iter(train) [5/8]' in out and 'Iter(train) [1/8]' not in out
    assert checkpoint_problem(str(work / 'iter_8.pth')) is None
    final = torch.load(work / 'iter_8.pth', map_location='cpu')
    assert final['meta']['iter'] == 8
    assert (work / 'last_checkpoint').read_text().strip() == str(work / 'iter_8.pth')
