"""Top-k classification accuracy."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from mmengine.evaluator import BaseMetric


class Accuracy(BaseMetric):
    """Top-k accuracy in percent from each sample's ``pred_score`` and ``gt_label``.

    Keys ``top1``, ``top5``, ... (``accuracy/top1`` with the default prefix). A k above
    the number of classes is an error rather than a trivial 100.
    """

    default_prefix = 'accuracy'

    def __init__(self, topk: Union[int, Sequence[int]] = (1, ), collect_device: str = 'cpu',
                 prefix: Optional[str] = None) -> None:
        super().__init__(collect_device=collect_device, prefix=prefix)
        self.topk = (topk, ) if isinstance(topk, int) else tuple(topk)
        if not self.topk or any(not isinstance(k, int) or k < 1 for k in self.topk):
            raise ValueError(f'topk must be positive integers, got {topk!r}')

    def process(self, data_batch, data_samples: Sequence) -> None:
        for sample in data_samples:  # dicts from the evaluator, or data elements
            score, label = sample.get('pred_score'), sample.get('gt_label')
            if score is None or label is None:
                raise KeyError('Accuracy needs pred_score and gt_label in every data sample')
            self.results.append((torch.as_tensor(score).cpu(),
                                 torch.as_tensor(label).reshape(()).cpu()))

    def compute_metrics(self, results: list) -> dict:
        scores = torch.stack([r[0] for r in results])
        labels = torch.stack([r[1] for r in results])
        num_classes = scores.size(1)
        if max(self.topk) > num_classes:
            raise ValueError(f'topk={self.topk} exceeds the number of classes ({num_classes})')
        ranked = scores.topk(max(self.topk), dim=1).indices
        hits = ranked == labels[:, None]
        return {f'top{k}': hits[:, :k].any(dim=1).float().mean().item() * 100
                for k in self.topk}
