# fcn_hr18_4xb2-40k_cityscapes-c-512x1024_syncjsbn.py adapted by TENT: entropy minimization
# of the norm layers' affine parameters with test-batch statistics, one Adam step (lr 1e-3)
# per batch.
_base_ = './fcn_hr18_4xb2-40k_cityscapes-c-512x1024_syncjsbn.py'
test_cfg = dict(
    _delete_=True,
    type='TestTimeAdaptLoop',
    method='tent',
    optimizer=dict(type='Adam', lr=1e-3),
    steps=1,
    episodic=False)
