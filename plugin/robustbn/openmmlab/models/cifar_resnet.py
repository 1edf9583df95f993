"""ResNet with the CIFAR stem, on mmseg's ResNet (blocks, norm_cfg, init, out_indices)."""
from mmcv.cnn import build_conv_layer, build_norm_layer
from mmseg.models.backbones.resnet import BasicBlock, ResNet
from torch import nn


class CifarResNet(ResNet):
    """ResNet for 32x32 input: a 3x3 stride-1 stem conv and no max pooling.

    ``depth=9`` is one BasicBlock per stage, the "ResNet9" of the JS-BN paper's code
    (widths 64-128-256-512, 1x1 conv + norm shortcut where the shape changes); 18, 34, 50,
    101 and 152 are the usual stage layouts. Returns the feature maps of ``out_indices``
    (default: the last stage). Norm layers are built by mmcv from ``norm_cfg`` and named
    ``bn1``, ``bn2``, ... as in mmseg's ResNet.
    """

    arch_settings = {9: (BasicBlock, (1, 1, 1, 1)), **ResNet.arch_settings}

    def __init__(self, depth: int, out_indices=(3, ), **kwargs):
        if kwargs.get('deep_stem'):
            raise ValueError('CifarResNet has a single 3x3 stem conv; deep_stem is not supported')
        super().__init__(depth, out_indices=out_indices, **kwargs)

    def _make_stem_layer(self, in_channels: int, stem_channels: int) -> None:
        self.conv1 = build_conv_layer(self.conv_cfg, in_channels, stem_channels, kernel_size=3,
                                      stride=1, padding=1, bias=False)
        self.norm1_name, norm1 = build_norm_layer(self.norm_cfg, stem_channels, postfix=1)
        self.add_module(self.norm1_name, norm1)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()  # keeps ResNet.forward; 32x32 input is not pooled
