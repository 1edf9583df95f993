# As the ZeRO-2 config, with ZeRO stage 1 (optimizer states partitioned, gradients not).
_base_ = ['./resnet50_imagenet_jsbn-ds-zero2.py']
strategy = dict(zero_optimization=dict(stage=1))
