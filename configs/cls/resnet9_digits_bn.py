_base_ = ['./resnet9_digits_syncjsbn.py']
model = dict(backbone=dict(norm_cfg=dict(_delete_=True, type='BN', requires_grad=True)))
