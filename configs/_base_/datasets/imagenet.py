# ImageNet as class folders: data_root/train/<wnid>/*.JPEG and data_root/val/<wnid>/*.JPEG
# (the validation images sorted into class folders, as torchvision's ImageFolder expects).
dataset_type = 'ImageFolder'
data_root = 'data/imagenet'

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='SeededAlbu', transforms=[
        dict(type='RandomResizedCrop', size=(224, 224), scale=(0.08, 1.0)),
        dict(type='HorizontalFlip', p=0.5),
    ]),
    dict(type='PackClsInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='SeededAlbu', transforms=[
        dict(type='SmallestMaxSize', max_size=256),
        dict(type='CenterCrop', height=224, width=224),
    ]),
    dict(type='PackClsInputs'),
]

# 32 per GPU on 8 GPUs: the batch of 256 of the standard recipe.
train_dataloader = dict(
    batch_size=32,
    num_workers=8,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=True),
    dataset=dict(type=dataset_type, data_root=data_root, data_prefix=dict(img_path='train'),
                 pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=32,
    num_workers=8,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type=dataset_type, data_root=data_root, data_prefix=dict(img_path='val'),
                 pipeline=test_pipeline))
val_evaluator = dict(type='Accuracy', topk=(1, 5))
test_dataloader = val_dataloader
test_evaluator = val_evaluator
