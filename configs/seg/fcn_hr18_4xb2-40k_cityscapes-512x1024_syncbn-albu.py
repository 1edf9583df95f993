# fcn_hr18_4xb2-40k_cityscapes-512x1024_syncbn.py with albumentations (configs/_base_/seg_albu.py)
# inserted into mmseg's training pipeline before PackSegInputs.
_base_ = ['./fcn_hr18_4xb2-40k_cityscapes-512x1024_syncbn.py', '../_base_/seg_albu.py']
train_pipeline = _base_.train_pipeline[:-1] + [
    dict(type='Albu', transforms=_base_.albu_transforms), _base_.train_pipeline[-1]]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
