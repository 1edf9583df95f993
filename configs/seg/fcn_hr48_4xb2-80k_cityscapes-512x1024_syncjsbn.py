# mmseg's FCN-HRNetV2-W48 on Cityscapes 512x1024, 80k iterations, with
# SyncJSBN (James-Stein batch norm, statistics over all ranks) in backbone and decode head.
_base_ = ['mmseg::hrnet/fcn_hr48_4xb2-80k_cityscapes-512x1024.py', '../_base_/adv_paper.py']
custom_imports = dict(imports=['robustbn'], allow_failed_imports=False)
# mmseg's top-level norm_cfg is substituted into the model when its base file is parsed:
# redefining it here would not reach the model, so set the model's keys.
norm_cfg = dict(type='SyncJSBN', requires_grad=True)
model = dict(backbone=dict(norm_cfg=norm_cfg), decode_head=dict(norm_cfg=norm_cfg))
