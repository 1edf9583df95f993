"""Images stored as <root>/<class>/<image> (ImageNet style)."""
from __future__ import annotations

import os
import os.path as osp
from typing import List, Sequence

from mmengine.dataset import BaseDataset

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')


class ImageFolder(BaseDataset):
    """One sub-folder of ``data_root/data_prefix['img_path']`` per class; images anywhere
    under it. Samples are ``dict(img_path=..., gt_label=int)``: load them in the pipeline
    (mmcv's ``LoadImageFromFile``).

    Classes are ``metainfo['classes']`` when given (only those folders are read, labels
    in that order), else all sub-folders in sorted order, as torchvision's ImageFolder.
    """

    def __init__(self, data_root: str = '', data_prefix: dict = dict(img_path=''),
                 extensions: Sequence[str] = IMG_EXTENSIONS, **kwargs) -> None:
        self.extensions = tuple(e.lower() for e in extensions)
        super().__init__(data_root=data_root, data_prefix=data_prefix, **kwargs)

    def load_data_list(self) -> List[dict]:
        root = self.data_prefix['img_path']
        if not osp.isdir(root):
            raise FileNotFoundError(f'image folder {root!r} not found')
        classes = self._metainfo.get('classes') or sorted(
            e.name for e in os.scandir(root) if e.is_dir())
        if not classes:
            raise ValueError(f'no class folders in {root!r}')
        data_list = []
        for label, name in enumerate(classes):
            class_dir = osp.join(root, name)
            if not osp.isdir(class_dir):
                raise FileNotFoundError(f'class folder {class_dir!r} not found')
            for dirpath, _, files in sorted(os.walk(class_dir, followlinks=True)):
                data_list.extend(dict(img_path=osp.join(dirpath, f), gt_label=label)
                                 for f in sorted(files) if f.lower().endswith(self.extensions))
        if not data_list:
            raise ValueError(f'no images with extensions {self.extensions} under {root!r}')
        self._metainfo['classes'] = tuple(classes)
        return data_list
