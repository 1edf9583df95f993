# The JS-BN paper code's CIFAR-10 data: no augmentation, 10000 training images held out
# for validation (torch random_split, generator seed 6), the test batch for testing.
dataset_type = 'CIFAR10'
data_root = 'data/cifar10'  # holds cifar-10-batches-py; set download=True to fetch it
pipeline = [dict(type='PackClsInputs')]

# batch_size is per GPU: with n GPUs use 128 // n to keep the batch of 128.
train_dataloader = dict(
    batch_size=128,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=True),
    dataset=dict(type=dataset_type, data_root=data_root, split='train', pipeline=pipeline,
                 val_size=10000, split_seed=6))
val_dataloader = dict(
    batch_size=128,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type=dataset_type, data_root=data_root, split='val', pipeline=pipeline,
                 val_size=10000, split_seed=6))
test_dataloader = dict(
    batch_size=128,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type=dataset_type, data_root=data_root, split='test', pipeline=pipeline))
val_evaluator = dict(type='Accuracy', topk=(1, 5))
test_evaluator = val_evaluator
