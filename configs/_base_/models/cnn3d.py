model = dict(
    type='ImageClassifier',
    # Set mean=[m], std=[s] to the volumes' intensity statistics.
    data_preprocessor=dict(type='VolumeDataPreprocessor'),
    backbone=dict(type='CNN3d', in_channels=1, channels=(3, 6, 6, 6),
                  norm_cfg=dict(type='BN3d', requires_grad=True)),
    head=dict(in_channels=6, num_classes=2),
)
