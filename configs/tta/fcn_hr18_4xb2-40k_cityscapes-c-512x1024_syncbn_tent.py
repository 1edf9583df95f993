# fcn_hr18_4xb2-40k_cityscapes-c-512x1024_syncjsbn_tent.py for the SyncBN model.
_base_ = './fcn_hr18_4xb2-40k_cityscapes-c-512x1024_syncjsbn_tent.py'
norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(backbone=dict(norm_cfg=norm_cfg), decode_head=dict(norm_cfg=norm_cfg))
