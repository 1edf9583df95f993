"""``--resume`` after a torn checkpoint save (tools/train.py).

mmengine 0.10.7's ``--resume`` reads ``WORK_DIR/last_checkpoint`` (``find_latest_checkpoint``)
and loads the file it names. ``CheckpointHook`` with ``max_keep_ckpts`` removes the oldest
kept checkpoint *before* it writes the new one, and rewrites ``last_checkpoint`` only after
the write. With ``max_keep_ckpts=1`` the removed file is the one ``last_checkpoint`` names:
a run killed while it writes checkpoint k+1 leaves ``last_checkpoint`` naming the deleted
checkpoint k and a truncated k+1, and mmengine's resume stops with ``FileNotFoundError``.

``resolve_resume(cfg)`` (auto resume only: ``cfg.resume`` true, no ``load_from``) checks
the file ``last_checkpoint`` names. When it is missing, empty or not a complete checkpoint
archive, it takes the newest complete checkpoint of the same name pattern (``iter_{N}.pth``
when the named file is ``iter_6.pth``) in the named file's folder, or in the work dir when
that folder is gone (a moved work dir), sets ``cfg.load_from`` to it (mmengine resumes from
``load_from`` when ``resume`` is set) and warns which file was named and which one it took.
Without any complete checkpoint it starts from scratch, with a warning: what mmengine does
for ``--resume`` when there is no ``last_checkpoint`` at all, so that requeued jobs always
passing ``--resume`` keep working.

"Complete" is a structural check: a torch checkpoint is a zip archive whose central
directory is written last, so a file cut short by a killed writer has none. Reading the
archive's directory is cheap for checkpoints of any size; the data are not read, so a
file damaged in the middle by the storage is not detected (mmengine's load reports it).
Unpickling is deliberately not part of the test: a checkpoint that ``torch.load`` refuses
for another reason (e.g. a global outside ``weights_only``'s allow-list) would make every
candidate fail and turn ``--resume`` into a silent fresh start.

Left as mmengine does it: DeepSpeed work dirs (checkpoints are directories), a
``last_checkpoint`` naming a remote path (``s3://...``) or a folder, and an explicit
``load_from``.
"""
from __future__ import annotations

import logging
import os
import os.path as osp
import re
import zipfile
from dataclasses import dataclass
from typing import List, Optional

from .launcher import is_deepspeed

LAST_CHECKPOINT = 'last_checkpoint'
# Templates tried when the named file has no step number in its name (mmengine's defaults).
DEFAULT_PATTERNS = (r'iter_(\d+)\.pth', r'epoch_(\d+)\.pth')


def checkpoint_problem(path: str) -> Optional[str]:
    """None when ``path`` is a complete checkpoint file, else what is wrong with it."""
    if not osp.exists(path):
        return 'missing'
    if not osp.isfile(path):
        return 'not a file'
    size = osp.getsize(path)
    if size == 0:
        return 'empty'
    with open(path, 'rb') as f:
        is_zip = f.read(4) == b'PK\x03\x04'
    if not is_zip:
        return _legacy_problem(path)
    if not zipfile.is_zipfile(path):
        return 'truncated (the zip archive has no central directory)'
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        return f'unreadable zip archive ({err})'
    if not any(i.filename == 'data.pkl' or i.filename.endswith('/data.pkl') for i in infos):
        return 'not a torch checkpoint (no data.pkl in the archive)'
    if any(i.header_offset + i.compress_size > size for i in infos):
        return 'truncated'
    return None


def _legacy_problem(path: str) -> Optional[str]:
    """A file that does not start as a zip archive: torch's pre-1.6 format if it loads."""
    import torch
    try:
        torch.load(path, map_location='cpu', weights_only=True)
    except Exception:  # noqa: BLE001 - any failure means: not usable
        return 'not a torch checkpoint'
    return None


@dataclass
class ResumePoint:
    """What ``--resume`` should do in a work dir.

    named: the path ``last_checkpoint`` names (None: there is no ``last_checkpoint``).
    problem: why ``named`` cannot be resumed from (None: it can, or there is nothing named).
    checkpoint: the file to resume from (``named``, or the newest complete fallback); None:
        start from scratch.
    """
    named: Optional[str]
    problem: Optional[str]
    checkpoint: Optional[str]


def _step_pattern(name: str) -> List[str]:
    """Regexes (one group: the step) for checkpoints named like ``name``."""
    numbers = list(re.finditer(r'\d+', name))
    if not numbers:
        return list(DEFAULT_PATTERNS)
    last = numbers[-1]
    return [re.escape(name[:last.start()]) + r'(\d+)' + re.escape(name[last.end():])]


def complete_checkpoints(folders, name: str) -> List[str]:
    """Complete checkpoints named like ``name`` in ``folders``, newest (highest step) first."""
    patterns = [re.compile(p) for p in _step_pattern(name)]
    found, seen = [], set()
    for folder in folders:
        if not osp.isdir(folder) or osp.realpath(folder) in seen:
            continue
        seen.add(osp.realpath(folder))
        for entry in os.listdir(folder):
            for pattern in patterns:
                match = pattern.fullmatch(entry)
                if match:
                    found.append((int(match.group(1)), osp.join(folder, entry)))
                    break
    found.sort(key=lambda step_path: step_path[0], reverse=True)
    return [path for _, path in found if checkpoint_problem(path) is None]


def find_resume_checkpoint(work_dir: str) -> ResumePoint:
    """Where ``--resume`` should continue from in ``work_dir`` (see the module docstring)."""
    save_file = osp.join(work_dir, LAST_CHECKPOINT)
    if not osp.isfile(save_file):
        return ResumePoint(None, None, None)  # mmengine starts from scratch
    with open(save_file) as f:
        named = f.read().strip()
    if '://' in named or osp.isdir(named):
        return ResumePoint(named, None, named)  # remote or DeepSpeed: mmengine's business
    problem = 'empty last_checkpoint' if not named else checkpoint_problem(named)
    if problem is None:
        return ResumePoint(named, None, named)
    folders = [osp.dirname(named), work_dir] if named else [work_dir]
    candidates = complete_checkpoints(folders, osp.basename(named))
    return ResumePoint(named, problem, candidates[0] if candidates else None)


def resolve_resume(cfg) -> Optional[ResumePoint]:
    """For ``cfg.resume`` (auto resume): when the checkpoint ``last_checkpoint`` names
    cannot be loaded, resume from the newest complete one (``cfg.load_from``) or, without
    one, start from scratch (``cfg.resume = False``); warn either way. Returns the
    ResumePoint, or None when mmengine's own resume applies untouched."""
    if not cfg.get('resume') or cfg.get('load_from') or is_deepspeed(cfg):
        return None
    point = find_resume_checkpoint(cfg.work_dir)
    if point.problem is None:
        return None
    from mmengine.logging import print_log
    what = f'{LAST_CHECKPOINT} names {point.named!r}, which cannot be resumed from ' \
           f'({point.problem})'
    if point.checkpoint is not None:
        cfg.load_from = point.checkpoint
        msg = f'--resume: {what}; resuming from {point.checkpoint}, the newest complete ' \
              'checkpoint, instead.'
    else:
        cfg.resume = False
        msg = f'--resume: {what}, and no complete checkpoint was found next to it or in ' \
              f'{cfg.work_dir}: training starts from scratch.'
    print_log(msg, logger='current', level=logging.WARNING)
    return point
