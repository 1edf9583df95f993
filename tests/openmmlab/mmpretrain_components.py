"""mmpretrain's CIFAR10 for synthesized CIFAR-layout data (tests/openmmlab/test_mmpretrain.py).

mmpretrain's ``CIFAR10`` checks every file of ``cifar-10-batches-py`` against the md5 sum
of the official CIFAR-10 release before it reads anything, and without ``download=True``
refuses files that do not match: no synthesized file can. ``UncheckedCIFAR10`` is that
class with the sums left out (``None``, which mmpretrain's own integrity check takes as
"the file must exist"); the files, their pickle format, the reading and the samples are
mmpretrain's. Registered in mmpretrain's DATASETS; configs load it with
``custom_imports=dict(imports=['robustbn', 'mmpretrain_components'])`` and tests/openmmlab
on PYTHONPATH (helpers.tool_env).
"""
from __future__ import annotations

from mmpretrain.datasets import CIFAR10
from mmpretrain.registry import DATASETS


@DATASETS.register_module()
class UncheckedCIFAR10(CIFAR10):
    """mmpretrain's CIFAR10 without the official files' md5 sums (existence is checked)."""

    train_list = [[name, None] for name, _ in CIFAR10.train_list]
    test_list = [[name, None] for name, _ in CIFAR10.test_list]
    meta = dict(CIFAR10.meta, md5=None)
