_base_ = ['./resnet18_cifar10_syncjsbn.py']
model = dict(backbone=dict(norm_cfg=dict(_delete_=True, type='SyncBN', requires_grad=True)))
