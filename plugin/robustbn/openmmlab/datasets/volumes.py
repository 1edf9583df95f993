"""Volumes stored as .npy files, labelled by a CSV file."""
from __future__ import annotations

import csv
import os.path as osp
from typing import List

import numpy as np
from mmengine.dataset import BaseDataset


class VolumeDataset(BaseDataset):
    """Volumes ``data_root/data_prefix['volume_path']/<filename>`` (.npy, (D, H, W) or
    (C, D, H, W)) labelled by the CSV ``ann_file`` with a header naming ``filename_key``
    and ``label_key`` columns (e.g. ``filename,label``).

    A label is an integer class index, or a class name from ``metainfo['classes']``.
    The array is loaded when a sample is fetched and given to the pipeline as ``volume``.
    """

    def __init__(self, ann_file: str, data_root: str = '',
                 data_prefix: dict = dict(volume_path=''), filename_key: str = 'filename',
                 label_key: str = 'label', **kwargs) -> None:
        self.filename_key, self.label_key = filename_key, label_key
        super().__init__(ann_file=ann_file, data_root=data_root, data_prefix=data_prefix,
                         **kwargs)

    def _label(self, value: str, row: int) -> int:
        classes = self._metainfo.get('classes')
        if classes and value in classes:
            return list(classes).index(value)
        try:
            label = int(value)
        except ValueError:
            raise ValueError(f'{self.ann_file} row {row}: label {value!r} is neither an '
                             f'integer nor one of the classes {classes}') from None
        if label < 0 or (classes and label >= len(classes)):
            raise ValueError(f'{self.ann_file} row {row}: label {label} out of range')
        return label

    def load_data_list(self) -> List[dict]:
        with open(self.ann_file, newline='') as f:
            reader = csv.DictReader(f)
            missing = {self.filename_key, self.label_key} - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f'{self.ann_file} lacks the columns {sorted(missing)} '
                                 f'(has {reader.fieldnames})')
            root = self.data_prefix['volume_path']
            data_list = [dict(volume_path=osp.join(root, r[self.filename_key]),
                              gt_label=self._label(r[self.label_key].strip(), i))
                         for i, r in enumerate(reader, 2)]
        if not data_list:
            raise ValueError(f'{self.ann_file} lists no volumes')
        return data_list

    def prepare_data(self, idx: int):
        data_info = self.get_data_info(idx)
        data_info['volume'] = np.load(data_info['volume_path'])
        return self.pipeline(data_info)
