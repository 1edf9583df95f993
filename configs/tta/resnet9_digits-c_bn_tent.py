# TENT on Digits-C (see resnet9_digits-c_bn.py): batch statistics, entropy minimization of
# the BN affine parameters with TENT's Adam lr 1e-3, the rest of the model in train mode
# (TENT's configure_model).
_base_ = './resnet9_digits-c_bn.py'

test_cfg = dict(method='tent', optimizer=dict(_delete_=True, type='Adam', lr=1e-3,
                                              betas=(0.9, 0.999), weight_decay=0.0),
                norm_kwargs=None)
