"""Pack an image or volume sample into model inputs and a data sample."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from mmcv.transforms import BaseTransform
from mmengine.structures import BaseDataElement


class PackClsInputs(BaseTransform):
    """``img`` (H, W) or (H, W, C) -> uint8-or-float (C, H, W) tensor, or ``volume``
    (D, H, W) or (C, D, H, W) -> float32 (C, D, H, W) tensor, as ``inputs``; ``gt_label``
    (when present) and the ``meta_keys`` found in the results go into ``data_samples``.
    ``img_shape`` is set from the packed input (augmentations need not update it).
    """

    def __init__(self, meta_keys: Sequence[str] = ('sample_idx', 'img_path', 'volume_path',
                                                   'ori_shape', 'img_shape')) -> None:
        self.meta_keys = tuple(meta_keys)

    def transform(self, results: dict) -> dict:
        if 'img' in results:
            img = np.asarray(results['img'])
            if img.ndim == 2:
                img = img[..., None]
            if img.ndim != 3:
                raise ValueError(f'img must be (H, W) or (H, W, C), got shape {img.shape}')
            inputs = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
        elif 'volume' in results:
            vol = np.asarray(results['volume'], dtype=np.float32)
            if vol.ndim == 3:
                vol = vol[None]
            if vol.ndim != 4:
                raise ValueError(f'volume must be (D, H, W) or (C, D, H, W), got shape {vol.shape}')
            inputs = torch.from_numpy(np.ascontiguousarray(vol))
        else:
            raise KeyError("PackClsInputs needs an 'img' or a 'volume' in the results")

        sample = BaseDataElement()
        if 'gt_label' in results:
            sample.gt_label = torch.as_tensor(results['gt_label'], dtype=torch.long).reshape(())
        meta = {k: results[k] for k in self.meta_keys if k in results}
        meta['img_shape'] = tuple(inputs.shape[1:])
        sample.set_metainfo(meta)
        return dict(inputs=inputs, data_samples=sample)

    def __repr__(self) -> str:
        return f'{type(self).__name__}(meta_keys={self.meta_keys})'
