model = dict(
    type='ImageClassifier',
    data_preprocessor=dict(
        type='ImgDataPreprocessor',
        mean=[125.307, 122.961, 113.8575],  # CIFAR-10, RGB, 0-255
        std=[51.5865, 50.847, 51.255],
        bgr_to_rgb=True),
    backbone=dict(type='CifarResNet', depth=18, norm_cfg=dict(type='BN', requires_grad=True)),
    head=dict(in_channels=512, num_classes=10),
)
