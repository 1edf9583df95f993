"""``TestTimeAdaptLoop``: mmengine's test/val loop with test-time adaptation."""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Union

import torch
from mmengine.evaluator import Evaluator
from mmengine.logging import HistoryBuffer, print_log
from mmengine.runner.amp import autocast
from mmengine.runner.base_loop import BaseLoop
from mmengine.structures import BaseDataElement
from torch.utils.data import DataLoader

from .adapter import Adapter
from .methods import check_method, check_norm_kwargs, check_steps, check_train_mode, optimizer_cfg

STAGES = ('val', 'test')


class TestTimeAdaptLoop(BaseLoop):
    """Test or validation loop that adapts a copy of the runner's model on the test data.

    As ``test_cfg`` or ``val_cfg``::

        dict(type='TestTimeAdaptLoop', method='gprebn',
             optimizer=dict(type='SGD', lr=2.5e-4, momentum=0.9), steps=1, episodic=False,
             norm_kwargs=dict(theta=1.0, target_momentum=0.05, batch_estimator='sample',
                              target_init='first_batch', target_average='var'))

    ``method``: 'source' (exactly mmengine's TestLoop/ValLoop), 'bn_adapt', 'tent' or
    'gprebn' (:mod:`robustbn.openmmlab.tta.methods`). ``optimizer``: an mmengine OPTIMIZERS config
    for 'tent'/'gprebn' (None: TENT's Adam lr 1e-3, DELTA's SGD lr 2.5e-4 momentum 0.9).
    ``steps``: gradient steps per batch. ``episodic``: reset model and optimizer after
    every batch. ``norm_kwargs``: GpreBN layer arguments ('gprebn' only; other methods
    ignore them). ``logits_module``: name of the submodule whose output is the logits
    (default: mmseg's ``decode_head.conv_seg``, else ``head``). ``fp16``: autocast, as in
    mmengine's loops (no loss scaling for the entropy). ``stage``: 'val' or 'test' hooks;
    None tells from the runner whether this loop is its val loop. ``train_mode``: the
    non-norm layers (dropout, ...) in train mode while adapting; None: the method's
    reference (True for 'tent', as TENT; False for the others).

    Every ``run()`` adapts a fresh deep copy of the runner's current model, so the model
    (a training model during validation included) is never changed; the adapted copy stays
    in ``adapted_model`` until the next run. The metrics get ``tta/entropy``: the mean
    prediction entropy of the forwards that made the predictions (all methods but 'source').
    """

    def __init__(self, runner, dataloader: Union[DataLoader, Dict],
                 evaluator: Union[Evaluator, Dict, List], method: str = 'gprebn',
                 optimizer: Optional[dict] = None, steps: int = 1, episodic: bool = False,
                 norm_kwargs: Optional[dict] = None, logits_module: Optional[str] = None,
                 fp16: bool = False, stage: Optional[str] = None,
                 train_mode: Optional[bool] = None) -> None:
        # Bad settings fail when the loop is built, not after a training epoch.
        check_method(method)
        check_train_mode(train_mode)
        optimizer_cfg(method, optimizer)
        check_norm_kwargs(norm_kwargs)
        check_steps(steps)
        if stage not in (None, *STAGES):
            raise ValueError(f"stage must be 'val', 'test' or None, got {stage!r}")
        super().__init__(runner, dataloader)
        if isinstance(evaluator, (dict, list)):
            self.evaluator = runner.build_evaluator(evaluator)
        else:
            self.evaluator = evaluator
        if hasattr(self.dataloader.dataset, 'metainfo'):
            self.evaluator.dataset_meta = self.dataloader.dataset.metainfo
            self.runner.visualizer.dataset_meta = self.dataloader.dataset.metainfo
        else:
            print_log(f'Dataset {type(self.dataloader.dataset).__name__} has no metainfo. '
                      '``dataset_meta`` in evaluator, metric and visualizer will be None.',
                      logger='current', level=logging.WARNING)
        self.method, self.optimizer, self.steps, self.episodic = method, optimizer, steps, episodic
        self.norm_kwargs, self.logits_module, self.fp16 = norm_kwargs, logits_module, fp16
        self.stage, self.train_mode = stage, train_mode
        self.losses: Dict[str, HistoryBuffer] = dict()
        self.adapter: Optional[Adapter] = None

    @property
    def adapted_model(self):
        """The model adapted by the last run (None for 'source' or before a run)."""
        return None if self.adapter is None else self.adapter.model

    def _stage(self) -> str:
        if self.stage is not None:
            return self.stage
        return 'val' if getattr(self.runner, '_val_loop', None) is self else 'test'

    def run(self) -> dict:
        stage = self._stage()
        self.runner.call_hook(f'before_{stage}')
        self.runner.call_hook(f'before_{stage}_epoch')
        self.runner.model.eval()
        self.losses.clear()
        self.adapter = None  # free the previous run's copy before making the next
        if self.method != 'source':
            self.adapter = Adapter(self.runner.model, self.method, self.optimizer, self.steps,
                                   self.episodic, self.norm_kwargs, self.logits_module,
                                   self.fp16, self.train_mode)
        for idx, data_batch in enumerate(self.dataloader):
            self.run_iter(idx, data_batch, stage)

        metrics = self.evaluator.evaluate(len(self.dataloader.dataset))
        if self.losses:
            metrics.update(loss_metrics(self.losses, stage))
        if self.adapter is not None:
            metrics['tta/entropy'] = self.adapter.mean_entropy()
        self.runner.call_hook(f'after_{stage}_epoch', metrics=metrics)
        self.runner.call_hook(f'after_{stage}')
        return metrics

    def run_iter(self, idx: int, data_batch, stage: str) -> None:
        self.runner.call_hook(f'before_{stage}_iter', batch_idx=idx, data_batch=data_batch)
        if self.adapter is None:
            with torch.no_grad(), autocast(enabled=self.fp16):
                outputs = getattr(self.runner.model, f'{stage}_step')(data_batch)
        else:
            outputs = self.adapter.adapt(data_batch)
        outputs = record_losses(outputs, self.losses)
        self.evaluator.process(data_samples=outputs, data_batch=data_batch)
        self.runner.call_hook(f'after_{stage}_iter', batch_idx=idx, data_batch=data_batch,
                              outputs=outputs)


# What mmengine's ValLoop/TestLoop do with a loss a model's val/test_step appends to its
# outputs (mmengine keeps these helpers private, so they are restated here).
def record_losses(outputs: list, losses: Dict[str, HistoryBuffer]) -> list:
    """The outputs without a trailing loss element, whose values go into ``losses``."""
    if outputs and isinstance(outputs[-1], BaseDataElement) and outputs[-1].keys() == ['loss']:
        for name, value in outputs[-1].loss.items():
            values = value if isinstance(value, (list, tuple)) else [value]
            for v in values:
                losses.setdefault(name, HistoryBuffer()).update(float(v))
        outputs = outputs[:-1]
    return outputs


def loss_metrics(losses: Dict[str, HistoryBuffer], stage: str) -> Dict[str, float]:
    """Each loss's mean and their sum over names containing 'loss' as ``{stage}_loss``."""
    out = {name: buf.mean() for name, buf in losses.items()}
    out[f'{stage}_loss'] = sum(v for name, v in out.items() if 'loss' in name)
    return out
