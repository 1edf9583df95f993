# ResNet-50 JSBN on ImageNet (the 90-epoch recipe of resnet50_imagenet_jsbn.py) trained
# through DeepSpeed ZeRO-2, bf16 parameters with float32 master weights.
_base_ = ['./resnet50_imagenet_jsbn.py', '../_base_/deepspeed_zero2.py']
optim_wrapper = dict(
    _delete_=True,
    type='DeepSpeedOptimWrapper',
    optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=1e-4))
# JSBN normalizes with each GPU's 32 images (as BN in this recipe), so running statistics
# differ between ranks; DeepSpeed saves rank 0's. Make that explicit: before every
# checkpoint (each epoch) rank 0's running statistics are copied to all ranks, as DDP's
# broadcast_buffers does every iteration. ('SyncJSBN' layers agree without it.)
default_hooks = dict(
    buffer_check=dict(type='BufferConsistencyHook', by_epoch=True, interval=1,
                      action='broadcast'))
