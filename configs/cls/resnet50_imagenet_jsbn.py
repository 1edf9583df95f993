# ImageNet, torchvision's ResNet-50, the standard 90-epoch recipe: random resized crop 224
# and horizontal flip, SGD 0.1 (batch 256) x0.1 at epochs 30 and 60, weight decay 1e-4;
# evaluation on the 224 centre crop of the image resized to 256.
# Statistics per GPU (32 images), as BN in that recipe; 'SyncJSBN' pools them over GPUs.
_base_ = [
    '../_base_/models/tv_resnet50.py', '../_base_/datasets/imagenet.py',
    '../_base_/schedules/imagenet_sgd_step_90e.py', '../_base_/default_runtime.py'
]
model = dict(backbone=dict(norm_cfg=dict(type='JSBN', requires_grad=True)))
