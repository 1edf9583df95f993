"""Online test-time adaptation of a copy of a model, one batch at a time."""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.distributed as dist
from mmengine.model import is_model_wrapper
from mmengine.runner.amp import autocast
from mmengine.structures import BaseDataElement
from torch import Tensor, nn

from ...base import sync_group
from .methods import (
    GRADIENT_METHODS,
    Snapshot,
    build_optimizer,
    capture_outputs,
    check_method,
    check_steps,
    configure_model,
    entropy_sum,
    find_logits_module,
    norm_affine_params,
    optimizer_cfg,
)


class Adapter:
    """Adapts a deep copy of ``model`` (never ``model`` itself) with ``method``
    ('bn_adapt', 'tent' or 'gprebn'; see :mod:`robustbn.openmmlab.tta.methods`).

    ``adapt(data_batch)`` returns the predictions of the batch as the model's ``test_step``
    formats them. With gradient steps, each of the ``steps`` iterations runs one forward in
    predict mode, minimizes the mean prediction entropy of that forward's logits and steps
    the optimizer; the predictions are those of the last iteration's forward, made before
    its update (TENT's online protocol). ``episodic``: model and optimizer return to their
    initial state after every batch.

    With a process group of several ranks, batch statistics are over all ranks (SyncJSBN /
    SyncGpreBN) and every rank steps with the gradient of the global batch's mean entropy:
    each rank backpropagates its local entropy *sum*, the synchronized norm layers' backward
    adds the other ranks' terms, and one all-reduce sums the parameter gradients and the
    position counts, by which they are divided.

    ``train_mode``: the non-norm layers (dropout, ...) in train mode while adapting; None:
    the method's reference (True for 'tent', as TENT; False otherwise).
    """

    def __init__(self, model: nn.Module, method: str, optimizer: Optional[dict] = None,
                 steps: int = 1, episodic: bool = False, norm_kwargs: Optional[dict] = None,
                 logits_module: Optional[str] = None, fp16: bool = False,
                 train_mode: Optional[bool] = None) -> None:
        check_method(method)
        if method == 'source':
            raise ValueError("method 'source' needs no adapter: run the model itself")
        check_steps(steps)
        model = model.module if is_model_wrapper(model) else model
        self.group = sync_group()
        self.method, self.steps, self.episodic, self.fp16 = method, steps, episodic, fp16
        self.model = configure_model(copy.deepcopy(model), method, norm_kwargs,
                                     sync=self.group is not None, train_mode=train_mode)
        self.logits_module = find_logits_module(self.model, logits_module)
        self.params = norm_affine_params(self.model) if method in GRADIENT_METHODS else []
        cfg = optimizer_cfg(method, optimizer)
        self.optimizer = build_optimizer(cfg, self.params) if cfg is not None else None
        # Without an optimizer nothing changes: no state to return to.
        self.snapshot = Snapshot(self.model, self.optimizer) \
            if episodic and self.optimizer is not None else None
        # Entropy sum over the run stays on the device (no host sync per batch); counts are
        # known on the host.
        self._entropy_sum: Optional[Tensor] = None
        self._entropy_count = 0

    def adapt(self, data_batch):
        """Adapt on ``data_batch`` (as the data loader yields it); returns the predictions."""
        if self.optimizer is None:
            with torch.no_grad(), capture_outputs(self.logits_module) as logits:
                with autocast(enabled=self.fp16):
                    outputs = self.model.test_step(data_batch)
            self._record(*self._entropy_of(logits))
            return outputs

        data = self.model.data_preprocessor(data_batch, False)
        for _ in range(self.steps):
            with torch.enable_grad(), capture_outputs(self.logits_module) as logits:
                with autocast(enabled=self.fp16):
                    outputs = self._predict(data)
                h_sum, count = self._entropy_of(logits)
                # The global mean's gradient: local sum here, divided by the global count
                # after the all-reduce (synchronized norm layers add the other ranks' terms).
                loss = h_sum if self.group is not None else h_sum / count
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
            if self.group is not None:
                self._all_reduce_grads(count)
            self.optimizer.step()
        self._record(h_sum.detach(), count)
        outputs = _detach(outputs)  # predictions carry no graph to the evaluator and hooks
        if self.snapshot is not None:
            self.reset()
        return outputs

    def reset(self) -> None:
        """Back to the initial (converted, unadapted) model and a fresh optimizer state."""
        if self.snapshot is not None:
            self.snapshot.restore(self.model, self.optimizer)
        elif self.optimizer is not None:  # bn_adapt has no state to return to
            raise RuntimeError('reset needs episodic=True (the initial state is kept only then)')

    def mean_entropy(self) -> float:
        """Mean entropy per prediction (sample or pixel) over all batches so far, all ranks
        (collective with a process group: every rank must call it)."""
        dev = next(self.model.parameters()).device
        h_sum = self._entropy_sum if self._entropy_sum is not None else \
            torch.zeros((), dtype=torch.float64, device=dev)
        stats = torch.stack([h_sum, h_sum.new_tensor(float(self._entropy_count))])
        if self.group is not None:
            dist.all_reduce(stats, group=self.group)
        total, count = stats.tolist()
        return total / count if count else float('nan')

    # ------------------------------------------------------------------ internals
    def _predict(self, data):
        # BaseModel.test_step without its data preprocessing (done once per batch)
        if isinstance(data, dict):
            return self.model(**data, mode='predict')
        return self.model(*data, mode='predict')

    @staticmethod
    def _entropy_of(logits):
        if not logits:
            raise RuntimeError('the logits module was not called in the forward; set the '
                               "loop's logits_module to the submodule that outputs the logits")
        sums = [entropy_sum(x) for x in logits]
        return sum(s for s, _ in sums), sum(n for _, n in sums)

    def _record(self, h_sum: Tensor, count: int) -> None:
        h_sum = h_sum.detach().double()
        self._entropy_sum = h_sum if self._entropy_sum is None else self._entropy_sum + h_sum
        self._entropy_count += count

    def _all_reduce_grads(self, count: int) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        ref = grads[0] if grads else self.params[0]
        flat = torch.cat([g.reshape(-1) for g in grads] + [ref.new_full((1,), float(count))])
        dist.all_reduce(flat, group=self.group)
        flat = flat[:-1] / flat[-1]
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def _detach(obj):
    """Detach the tensors of predictions (data elements, dicts, lists) in place."""
    if isinstance(obj, Tensor):
        return obj.detach()
    if isinstance(obj, BaseDataElement):
        for key, value in list(obj.items()):
            new = _detach(value)
            if new is not value:
                setattr(obj, key, new)
        return obj
    if isinstance(obj, dict):
        for key in list(obj):
            obj[key] = _detach(obj[key])
        return obj
    if isinstance(obj, list):
        for i, value in enumerate(obj):
            obj[i] = _detach(value)
        return obj
    return obj
