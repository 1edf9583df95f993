# The Cityscapes FCN-HRNetV2-W18 with SyncJSBN (configs/seg/fcn_hr18_4xb2-40k_cityscapes-
# 512x1024_syncjsbn.py) tested on Cityscapes val corrupted on the fly by ImageNetCorruption,
# with test-time adaptation by GpreBN. One corruption at one severity per run: set
# corruption / severity of the ImageNetCorruption step of test_dataloader.dataset.pipeline
# (tools/tta_test.py does). Other methods: test_cfg.method=source or bn_adapt through
# --cfg-options; TENT: fcn_hr18_4xb2-40k_cityscapes-c-512x1024_syncjsbn_tent.py.
_base_ = '../seg/fcn_hr18_4xb2-40k_cityscapes-512x1024_syncjsbn.py'

# Corrupt right after loading, at full resolution, before mmseg's Resize; the label map is
# loaded later and never corrupted. seed=0 fixes the noise per image, so every method and
# model is tested on the same corrupted images.
test_pipeline = [_base_.test_pipeline[0],
                 dict(type='ImageNetCorruption', corruption='gaussian_noise', severity=5, seed=0)
                 ] + _base_.test_pipeline[1:]
# mmseg's test batch of 1 image (2 Mpixel: plenty of values per channel for batch statistics).
test_dataloader = dict(batch_size=1, dataset=dict(pipeline=test_pipeline))

# GpreBN as DELTA's TBR: SGD 2.5e-4 momentum 0.9 on the norm layers, one step per batch,
# adaptation carried across batches (episodic=False); dataset statistics = the test-time EMA.
test_cfg = dict(
    type='TestTimeAdaptLoop',
    method='gprebn',
    optimizer=dict(type='SGD', lr=2.5e-4, momentum=0.9),
    steps=1,
    episodic=False,
    norm_kwargs=dict(theta=1.0, target_momentum=0.05, batch_estimator='sample'))
# Accuracy under corruption only: the adversarial evaluation of configs/seg stays there.
custom_hooks = []
