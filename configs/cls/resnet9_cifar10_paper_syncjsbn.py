# The JS-BN paper code's CIFAR-10 run: ResNet9, inputs in [0, 1], no augmentation, batch
# 128, SGD lr 1e-3 momentum 0.9 nesterov weight decay 1e-4 for 5 epochs, validation on
# 10000 held-out training images after each epoch, the best of them kept for testing.
_base_ = [
    '../_base_/models/cifar_resnet9.py', '../_base_/datasets/cifar10_paper.py',
    '../_base_/schedules/paper_sgd_5e.py', '../_base_/default_runtime.py',
    '../_base_/adv_paper.py'
]
# Evaluation uses the running statistics. The paper's code normalizes evaluation batches
# with their own statistics: eval_stats='batch' reproduces that (a prediction then
# depends on the rest of its batch of 128, so keep the val/test batch size).
model = dict(backbone=dict(norm_cfg=dict(
    type='SyncJSBN', requires_grad=True, estimator='paper', eval_stats='running')))
default_hooks = dict(checkpoint=dict(save_best='accuracy/top1', rule='greater'))
