_base_ = ['./cnn3d_volumes_jsbn3d.py']
model = dict(backbone=dict(norm_cfg=dict(_delete_=True, type='BN3d', requires_grad=True)))
