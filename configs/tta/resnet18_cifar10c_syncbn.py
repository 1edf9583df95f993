# resnet18_cifar10c_syncjsbn.py for the SyncBN model (configs/cls/resnet18_cifar10_syncbn.py).
_base_ = './resnet18_cifar10c_syncjsbn.py'
model = dict(backbone=dict(norm_cfg=dict(_delete_=True, type='SyncBN', requires_grad=True)))
