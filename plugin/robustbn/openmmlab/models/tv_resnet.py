"""torchvision's ResNet with mmcv-built norm layers, loading torchvision checkpoints."""
from __future__ import annotations

from functools import partial
from typing import Optional

from mmcv.cnn import build_norm_layer
from mmengine.runner import CheckpointLoader
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet


def _norm_layer(norm_cfg: dict, num_features: int):
    # A module-level function (through partial) keeps the model picklable.
    return build_norm_layer(norm_cfg, num_features)[1]


class TorchvisionResNet(ResNet):
    """torchvision's ResNet (``resnet50()`` for ``depth=50``) without its pooling and fc,
    its norm layers built from ``norm_cfg`` (e.g. ``dict(type='SyncJSBN')``).

    Parameter and buffer names are torchvision's, so ``pretrained`` (a torchvision
    state_dict: a local path, or anything mmengine's CheckpointLoader reads, e.g.
    ``'torchvision://resnet50'``) loads strictly in ``init_weights``; its ``fc.*`` entries
    are dropped, the classifier's head replaces them. Returns the last feature map.
    """

    arch_settings = {
        18: (BasicBlock, [2, 2, 2, 2]),
        34: (BasicBlock, [3, 4, 6, 3]),
        50: (Bottleneck, [3, 4, 6, 3]),
        101: (Bottleneck, [3, 4, 23, 3]),
        152: (Bottleneck, [3, 8, 36, 3]),
    }

    def __init__(self, depth: int = 50, norm_cfg: Optional[dict] = None,
                 pretrained: Optional[str] = None, zero_init_residual: bool = False) -> None:
        if depth not in self.arch_settings:
            raise ValueError(f'depth must be one of {sorted(self.arch_settings)}, got {depth}')
        norm_cfg = norm_cfg or dict(type='BN', requires_grad=True)
        block, layers = self.arch_settings[depth]
        super().__init__(block, layers, zero_init_residual=zero_init_residual,
                         norm_layer=partial(_norm_layer, norm_cfg))
        del self.avgpool, self.fc
        self.pretrained = pretrained

    def init_weights(self) -> None:
        if not self.pretrained:
            return
        state = CheckpointLoader.load_checkpoint(self.pretrained, map_location='cpu')
        state = state.get('state_dict', state)
        state = {k: v for k, v in state.items() if not k.startswith('fc.')}
        self.load_state_dict(state, strict=True)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))
