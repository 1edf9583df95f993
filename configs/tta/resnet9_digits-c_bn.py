# The digits ResNet9 with BN (configs/cls/resnet9_digits_bn.py) tested on Digits-C with
# test-time adaptation by GpreBN: a distribution-shift benchmark that runs on a CPU in
# minutes (tools/tta_benchmark.py runs the full matrix). One corruption at one severity per
# run: set test_dataloader.dataset.corruption / .severity (tools/tta_test.py does).
# Other methods: test_cfg.method=source or bn_adapt through --cfg-options; TENT:
# resnet9_digits-c_bn_tent.py.
_base_ = '../cls/resnet9_digits_bn.py'

test_dataloader = dict(
    batch_size=64,
    num_workers=0,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(_delete_=True, type='DigitsC', corruption='gaussian_noise', severity=5,
                 seed=0, split='test', split_seed=0, img_size=32, cache_dir='data/digits_c',
                 pipeline=[dict(type='PackClsInputs')]))
test_evaluator = dict(type='Accuracy', topk=(1, ))

# GpreBN: the test-time average starts from the first test batch and averages the
# variance; DELTA's SGD 2.5e-4 momentum 0.9 on the norm layers' affine parameters, one
# step per batch, adaptation carried across batches (one corruption per run = episodic
# per corruption).
test_cfg = dict(
    type='TestTimeAdaptLoop',
    method='gprebn',
    optimizer=dict(type='SGD', lr=2.5e-4, momentum=0.9),
    steps=1,
    episodic=False,
    norm_kwargs=dict(theta=1.0, target_momentum=0.05, batch_estimator='sample',
                     target_init='first_batch', target_average='var'))
