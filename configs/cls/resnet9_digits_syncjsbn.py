# scikit-learn's bundled digits (no download) with a narrow ResNet9 (widths 16-128): a
# CPU-sized comparison of the norm layers. SGD 0.05 nesterov, cosine over 30 epochs.
_base_ = [
    '../_base_/models/cifar_resnet9.py', '../_base_/datasets/digits.py',
    '../_base_/schedules/sgd_cosine_30e.py', '../_base_/default_runtime.py'
]
model = dict(
    backbone=dict(stem_channels=16, base_channels=16,
                  norm_cfg=dict(type='SyncJSBN', requires_grad=True)),
    head=dict(in_channels=128, num_classes=10))
default_hooks = dict(logger=dict(interval=10))
