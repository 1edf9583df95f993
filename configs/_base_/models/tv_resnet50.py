model = dict(
    type='ImageClassifier',
    data_preprocessor=dict(
        type='ImgDataPreprocessor',
        mean=[123.675, 116.28, 103.53],  # ImageNet, RGB, 0-255
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True),
    # pretrained: a torchvision ResNet-50 state_dict (a local .pth, or 'torchvision://resnet50')
    # loaded strictly at weight initialization; None trains from scratch.
    backbone=dict(type='TorchvisionResNet', depth=50, pretrained=None,
                  norm_cfg=dict(type='BN', requires_grad=True)),
    head=dict(in_channels=2048, num_classes=1000),
)
