# CIFAR-10, CIFAR-stem ResNet-18, the usual strong recipe: random crop (4-pixel padding) and
# horizontal flip, SGD 0.1 nesterov, weight decay 5e-4, cosine over 200 epochs, batch 128.
_base_ = [
    '../_base_/models/cifar_resnet18.py', '../_base_/datasets/cifar10.py',
    '../_base_/schedules/cifar10_sgd_cosine_200e.py', '../_base_/default_runtime.py'
]
model = dict(backbone=dict(norm_cfg=dict(type='SyncJSBN', requires_grad=True)))
