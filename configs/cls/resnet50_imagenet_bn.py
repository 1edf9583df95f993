_base_ = ['./resnet50_imagenet_jsbn.py']
model = dict(backbone=dict(norm_cfg=dict(_delete_=True, type='BN', requires_grad=True)))
