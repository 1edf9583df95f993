"""A small 3D CNN for volumes."""
from __future__ import annotations

from typing import Optional, Sequence

from mmcv.cnn import build_conv_layer, build_norm_layer
from mmengine.model import BaseModule
from torch import nn


class CNN3d(BaseModule):
    """``len(channels)`` blocks of Conv3d -> norm -> ReLU -> 2x max pooling, for (N, C, D, H, W).

    The defaults (channels 3, 6, 6, 6) are the JS-BN paper's PPMI model. Layers are named
    ``conv1``/``bn1``, ``conv2``/``bn2``, ...; ``norm_cfg`` takes any 3D norm
    (``'BN3d'``, ``'JSBN3d'``, ``'SyncJSBN'``). Returns the last feature map.
    """

    def __init__(self, in_channels: int = 1, channels: Sequence[int] = (3, 6, 6, 6),
                 kernel_size: int = 3, norm_cfg: Optional[dict] = None,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg)
        if not channels:
            raise ValueError('channels must name at least one layer')
        norm_cfg = norm_cfg or dict(type='BN3d', requires_grad=True)
        self.norm_names = []
        for i, out_channels in enumerate(channels, 1):
            self.add_module(f'conv{i}', build_conv_layer(
                dict(type='Conv3d'), in_channels, out_channels, kernel_size,
                padding=kernel_size // 2, bias=False))
            name, norm = build_norm_layer(norm_cfg, out_channels, postfix=i)
            self.add_module(name, norm)
            self.norm_names.append(name)
            in_channels = out_channels
        self.relu = nn.ReLU(inplace=True)
        # ceil_mode: a side that has shrunk to 1 stays 1 instead of raising.
        self.pool = nn.MaxPool3d(2, ceil_mode=True)

    def forward(self, x):
        if x.dim() != 5:
            raise ValueError(f'CNN3d expects (N, C, D, H, W) input, got shape {tuple(x.shape)}')
        for i, name in enumerate(self.norm_names, 1):
            x = self.pool(self.relu(getattr(self, name)(getattr(self, f'conv{i}')(x))))
        return x
