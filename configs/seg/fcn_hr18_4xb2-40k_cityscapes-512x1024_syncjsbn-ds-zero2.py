# fcn_hr18 SyncJSBN on Cityscapes (mmseg's 40k schedule) trained through DeepSpeed ZeRO-2.
# Launch exactly like the plain config (tools/train.py, tools/dist_train.sh, Slurm) or with
# the `deepspeed` launcher (README). On a machine without CUDA it runs on gloo as is.
_base_ = [
    './fcn_hr18_4xb2-40k_cityscapes-512x1024_syncjsbn.py', '../_base_/deepspeed_zero2.py'
]
# mmseg's SGD and PolyLR schedule, unchanged; the wrapper takes no clip_grad (see the base).
optim_wrapper = dict(
    _delete_=True,
    type='DeepSpeedOptimWrapper',
    optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=0.0005))
# DeepSpeed broadcasts parameters, not buffers, and saves rank 0's: every checkpoint
# (interval 4000) checks that SyncJSBN's running statistics agree on all ranks.
default_hooks = dict(buffer_check=dict(type='BufferConsistencyHook', interval=4000))
