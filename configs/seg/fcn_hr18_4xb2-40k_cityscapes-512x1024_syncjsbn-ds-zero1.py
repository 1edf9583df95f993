# As the ZeRO-2 config, with ZeRO stage 1 (optimizer states partitioned, gradients not).
_base_ = ['./fcn_hr18_4xb2-40k_cityscapes-512x1024_syncjsbn-ds-zero2.py']
strategy = dict(zero_optimization=dict(stage=1))
