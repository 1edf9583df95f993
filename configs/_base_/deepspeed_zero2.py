# DeepSpeed (ZeRO stage 2) through mmengine's FlexibleRunner and DeepSpeedStrategy.
# - bf16: DeepSpeed casts the parameters to bfloat16 and keeps float32 master weights in
#   the optimizer; buffers (running statistics) stay float32, and the JS-BN layers compute
#   their statistics in float32. `inputs_to_half` casts the data preprocessor's output to
#   the parameters' dtype. fp32: --cfg-options strategy.bf16.enabled=False.
# - Gradient clipping is the engine's (DeepSpeedOptimWrapper has no clip_grad): the
#   global norm of the float32 gradients, a safety net here; 0 turns it off.
# - SGD is not on DeepSpeed's list of ZeRO-tested optimizers: zero_allow_untested_optimizer.
# - train_micro_batch_size_per_gpu comes from the train dataloader's batch size.
runner_type = 'FlexibleRunner'
strategy = dict(
    type='DeepSpeedStrategy',
    zero_optimization=dict(
        stage=2,
        overlap_comm=True,
        contiguous_gradients=True,
        reduce_bucket_size=50_000_000,
        allgather_bucket_size=50_000_000),
    bf16=dict(enabled=True),
    inputs_to_half=['inputs'],
    gradient_clipping=35.0,
    config=dict(zero_allow_untested_optimizer=True),
)
