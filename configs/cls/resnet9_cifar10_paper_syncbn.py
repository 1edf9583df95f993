_base_ = ['./resnet9_cifar10_paper_syncjsbn.py']
model = dict(backbone=dict(norm_cfg=dict(_delete_=True, type='SyncBN', requires_grad=True)))
