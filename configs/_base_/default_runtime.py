custom_imports = dict(imports=['robustbn'], allow_failed_imports=False)

# robustbn's types, mmcv's transforms and mmengine's hooks/optimizers all live in (or are
# reachable from) mmengine's root registries; mmseg's are reached as 'mmseg.<Type>'.
default_scope = 'mmengine'

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=100),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=3),
    sampler_seed=dict(type='DistSamplerSeedHook'),
)

env_cfg = dict(
    cudnn_benchmark=True,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'),
)

vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='Visualizer', vis_backends=vis_backends)
log_processor = dict(by_epoch=True, window_size=50)
log_level = 'INFO'
load_from = None
resume = False

# A fixed seed: the norm-layer twins of a config start from the same weights and see the
# same batches (building norm layers draws no random numbers).
randomness = dict(seed=0, deterministic=False)
