# The JS-BN paper's attacks (torchattacks on [0, 1] images): FGSM eps 0.03, PGD eps 0.03
# with step 1/255, 5 steps, random start. Here in pixel units of the raw 0-255 image the
# data preprocessor receives: eps 0.03 * 255 = 7.65, alpha 1. After every validation and
# at test; metrics adv/FGSM_eps7.65/... and adv/PGD-5_eps7.65/...
adv_attacks = [
    dict(type='FGSM', eps=7.65),
    dict(type='PGD', eps=7.65, alpha=1, steps=5, random_start=True),
]
custom_hooks = [dict(type='AdversarialEvalHook', attacks=adv_attacks)]
