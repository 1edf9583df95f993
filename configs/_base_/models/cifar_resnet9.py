# The JS-BN paper code's "ResNet9": CIFAR-stem ResNet, one BasicBlock per stage, its
# PyTorch default initialization, inputs scaled to [0, 1] without normalization
# (torchvision ToTensor), as in that code.
model = dict(
    type='ImageClassifier',
    data_preprocessor=dict(
        type='ImgDataPreprocessor', mean=[0., 0., 0.], std=[255., 255., 255.], bgr_to_rgb=True),
    backbone=dict(
        type='CifarResNet', depth=9, zero_init_residual=False, init_cfg=[],
        norm_cfg=dict(type='BN', requires_grad=True)),
    head=dict(in_channels=512, num_classes=10),
)
