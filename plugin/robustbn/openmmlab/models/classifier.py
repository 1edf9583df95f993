"""Image (and volume) classifier: data preprocessor -> backbone -> pooled linear head."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from mmengine.model import BaseModel
from mmengine.registry import MODELS
from mmengine.structures import BaseDataElement
from torch import Tensor, nn


class LinearClsHead(nn.Module):
    """Global average pooling over all spatial dims (2D or 3D), then a linear layer."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f'num_classes must be >= 2, got {num_classes}')
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() > 2:
            x = x.flatten(2).mean(-1)
        return self.fc(self.dropout(x))


class ImageClassifier(BaseModel):
    """``data_preprocessor`` -> ``backbone`` -> ``LinearClsHead(**head)``, cross-entropy loss.

    ``forward(inputs, data_samples, mode)``: ``'tensor'`` gives the logits (N, K),
    ``'loss'`` ``dict(loss=...)`` (labels from each sample's ``gt_label``), ``'predict'``
    the data samples with ``pred_score`` (softmax) and ``pred_label`` added. Inputs are
    what the data preprocessor returns, so ``model(model.data_preprocessor(dict(inputs=x))
    ['inputs'])`` gives the logits of raw images ``x``.
    """

    def __init__(self, backbone: dict, head: dict, data_preprocessor: Optional[dict] = None,
                 label_smoothing: float = 0.0, init_cfg: Optional[dict] = None) -> None:
        if data_preprocessor is None:
            data_preprocessor = dict(type='ImgDataPreprocessor')
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self.backbone = MODELS.build(backbone)
        self.head = LinearClsHead(**head)
        self.label_smoothing = label_smoothing

    def extract_feat(self, inputs: Tensor) -> Tensor:
        feats = self.backbone(inputs)
        # mmseg-style backbones return a tuple of stage outputs: classify the last one.
        return feats[-1] if isinstance(feats, (tuple, list)) else feats

    def forward(self, inputs: Tensor, data_samples: Optional[List[BaseDataElement]] = None,
                mode: str = 'tensor'):
        logits = self.head(self.extract_feat(inputs))
        if mode == 'tensor':
            return logits
        if mode == 'loss':
            return dict(loss=F.cross_entropy(logits, self._labels(data_samples, logits),
                                             label_smoothing=self.label_smoothing))
        if mode == 'predict':
            return self._predict(logits, data_samples)
        raise ValueError(f"mode must be 'loss', 'predict' or 'tensor', got {mode!r}")

    @staticmethod
    def _labels(data_samples: Optional[Sequence[BaseDataElement]], logits: Tensor) -> Tensor:
        if not data_samples or len(data_samples) != len(logits):
            raise ValueError("mode='loss' needs one data sample with a gt_label per input")
        return torch.stack([s.gt_label.reshape(()) for s in data_samples]).to(logits.device)

    @staticmethod
    def _predict(logits: Tensor, data_samples: Optional[List[BaseDataElement]]):
        scores = logits.softmax(dim=1).detach()
        if data_samples is None:
            data_samples = [BaseDataElement() for _ in range(len(logits))]
        elif len(data_samples) != len(logits):
            raise ValueError(f'{len(data_samples)} data samples for {len(logits)} inputs')
        for sample, score in zip(data_samples, scores):
            sample.pred_score = score
            sample.pred_label = score.argmax()
        return data_samples
