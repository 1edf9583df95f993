# resnet18_cifar10c_syncjsbn_tent.py for the SyncBN model.
_base_ = './resnet18_cifar10c_syncjsbn_tent.py'
model = dict(backbone=dict(norm_cfg=dict(_delete_=True, type='SyncBN', requires_grad=True)))
