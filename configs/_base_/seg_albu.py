# albumentations transforms for mmseg's Albu, appended to a segmentation training
# pipeline after mmseg's own augmentation (see configs/seg/*-albu.py). Photometric ones,
# and a small affine warp whose uncovered label pixels get 255 (mmseg's ignore index):
# albumentations 2.x fills masks with 0, a real class, unless fill_mask is set.
albu_transforms = [
    dict(type='Affine', rotate=(-10, 10), scale=(0.9, 1.1), interpolation=1,
         mask_interpolation=0, border_mode=0, fill=0, fill_mask=255, p=0.3),
    dict(type='OneOf', transforms=[
        dict(type='GaussianBlur', blur_limit=(3, 5), p=1.0),
        dict(type='MotionBlur', blur_limit=(3, 7), p=1.0),
    ], p=0.2),
    dict(type='GaussNoise', std_range=(0.02, 0.08), p=0.2),
    dict(type='ImageCompression', quality_range=(60, 95), p=0.2),
]
