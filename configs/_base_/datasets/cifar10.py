dataset_type = 'CIFAR10'
data_root = 'data/cifar10'  # holds cifar-10-batches-py; set download=True to fetch it

train_pipeline = [
    dict(type='SeededAlbu', transforms=[
        dict(type='Pad', padding=4, fill=0, border_mode=0),  # cv2.BORDER_CONSTANT
        dict(type='RandomCrop', height=32, width=32),
        dict(type='HorizontalFlip', p=0.5),
    ]),
    dict(type='PackClsInputs'),
]
test_pipeline = [dict(type='PackClsInputs')]

# batch_size is per GPU: with n GPUs use 128 // n to keep the batch of 128.
train_dataloader = dict(
    batch_size=128,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=True),
    dataset=dict(type=dataset_type, data_root=data_root, split='train', pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=128,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type=dataset_type, data_root=data_root, split='test', pipeline=test_pipeline))
val_evaluator = dict(type='Accuracy', topk=(1, 5))
test_dataloader = val_dataloader
test_evaluator = val_evaluator
