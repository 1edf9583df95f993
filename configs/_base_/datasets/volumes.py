# Volumes as data_root/volumes/*.npy, labelled by data_root/{train,test}.csv
# (columns filename,label).
dataset_type = 'VolumeDataset'
data_root = 'data/volumes'
pipeline = [dict(type='PackClsInputs')]

train_dataloader = dict(
    batch_size=8,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=True),
    dataset=dict(type=dataset_type, data_root=data_root, ann_file='train.csv',
                 data_prefix=dict(volume_path='volumes'), pipeline=pipeline))
val_dataloader = dict(
    batch_size=8,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type=dataset_type, data_root=data_root, ann_file='test.csv',
                 data_prefix=dict(volume_path='volumes'), pipeline=pipeline))
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_dataloader = val_dataloader
test_evaluator = val_evaluator
