# Volume classification with the JS-BN paper's small 3D CNN (conv3d + norm, 3-6-6-6
# channels), Adam, 50 epochs.
_base_ = [
    '../_base_/models/cnn3d.py', '../_base_/datasets/volumes.py',
    '../_base_/schedules/adam_50e.py', '../_base_/default_runtime.py'
]
model = dict(backbone=dict(norm_cfg=dict(type='JSBN3d', requires_grad=True)))
