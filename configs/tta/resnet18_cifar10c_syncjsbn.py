# The CIFAR-10 ResNet-18 (configs/cls/resnet18_cifar10_syncjsbn.py) tested on CIFAR-10-C with
# test-time adaptation by GpreBN. One corruption at one severity per run: set
# test_dataloader.dataset.corruption / .severity (tools/tta_test.py does; or --cfg-options).
# Other methods: test_cfg.method=source (no adaptation) or bn_adapt (test-batch statistics)
# through --cfg-options; TENT needs its own optimizer: resnet18_cifar10c_syncjsbn_tent.py.
_base_ = '../cls/resnet18_cifar10_syncjsbn.py'

# Batch 128, the training batch (TENT's released CIFAR-10-C configs use 200, DELTA 64:
# --cfg-options test_dataloader.batch_size=...). In file order, as those runs read them.
test_dataloader = dict(
    batch_size=128,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        _delete_=True,
        type='CIFAR10C',
        data_root='data/CIFAR-10-C',  # the extracted CIFAR-10-C.tar: <corruption>.npy, labels.npy
        corruption='gaussian_noise',
        severity=5,
        pipeline=[dict(type='PackClsInputs')]))
test_evaluator = dict(type='Accuracy', topk=(1, 5))

# GpreBN as DELTA's TBR: SGD 2.5e-4 momentum 0.9 on the norm layers, one step per batch,
# adaptation carried across batches (episodic=False); dataset statistics = the test-time EMA.
test_cfg = dict(
    type='TestTimeAdaptLoop',
    method='gprebn',
    optimizer=dict(type='SGD', lr=2.5e-4, momentum=0.9),
    steps=1,
    episodic=False,
    norm_kwargs=dict(theta=1.0, target_momentum=0.05, batch_estimator='sample'))
