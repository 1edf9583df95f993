# Time adversarial evaluation of a segmentor per batch: clean prediction, one
# forward+backward of the attacked function, FGSM and PGD-k (attack + prediction, as
# AdversarialEvalHook runs them), and PGD-k / ((k + 1) x forward+backward), the overhead
# of the attack loop over its k gradient steps and one prediction.
#
#   python tools/benchmark_adv.py [--config CFG] [--size 512 1024] [--batch 2] [--steps 10]
#   python tools/benchmark_adv.py --size 64 128 --iters 2 --warmup 1   # a quick CPU run
#
# Random weights and images (timing does not depend on them); GPU when available.
import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = 'configs/seg/fcn_hr18_4xb2-40k_cityscapes-512x1024_syncjsbn.py'


def parse_args():
    parser = argparse.ArgumentParser(description='Time clean vs FGSM vs PGD evaluation')
    parser.add_argument('--config', default=str(ROOT / DEFAULT_CONFIG))
    parser.add_argument('--size', nargs=2, type=int, default=[512, 1024], metavar=('H', 'W'))
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--steps', type=int, default=10, help='PGD steps k')
    parser.add_argument('--iters', type=int, default=5, help='timed repetitions')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--out', help='write the results as JSON here')
    return parser.parse_args()


def build(args):
    from mmengine import Config
    from mmengine.model import revert_sync_batchnorm
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    import robustbn  # noqa: F401  (JS layers, AdversarialEvalHook)
    register_all_modules(init_default_scope=True)
    cfg = Config.fromfile(args.config)
    cfg.model.pretrained = None  # timing needs no ImageNet weights
    cfg.model.data_preprocessor.size = tuple(args.size)
    model = revert_sync_batchnorm(MODELS.build(cfg.model))  # one process: no SyncBN
    return model.to(args.device).eval()


def batch(args, num_classes):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    g = torch.Generator().manual_seed(0)
    h, w = args.size
    inputs, samples = [], []
    for _ in range(args.batch):
        inputs.append(torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8))
        label = torch.randint(0, num_classes, (1, h, w), generator=g)
        label[:, : h // 8] = 255  # some ignored pixels, as in Cityscapes
        s = SegDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), flip=False))
        s.gt_sem_seg = PixelData(data=label)
        samples.append(s)
    return dict(inputs=inputs, data_samples=samples)


def timed(fn, args):
    sync = torch.cuda.synchronize if args.device.startswith('cuda') else (lambda: None)
    for _ in range(args.warmup):
        fn()
    times = []
    for _ in range(args.iters):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main():
    args = parse_args()
    import copy

    import torch.nn.functional as F

    from robustbn.openmmlab.adversarial.attacks import (
        AttackedModel,
        attack_labels,
        build_attack,
        perturb,
    )

    model = build(args)
    data = batch(args, model.decode_head.num_classes)
    wrapper = AttackedModel(model)
    labels = attack_labels(model, data['data_samples'], args.device)
    _, fgsm = build_attack(dict(type='FGSM', eps=8), wrapper)
    pgd_name, pgd = build_attack(dict(type='PGD', eps=8, alpha=2, steps=args.steps), wrapper)

    def clean():
        with torch.no_grad():
            model.test_step(dict(data, data_samples=copy.deepcopy(data['data_samples'])))

    def forward_backward():
        wrapper.set_batch(data['data_samples'], as_list=True)
        x = (torch.stack(data['inputs']).to(args.device).float() / 255).requires_grad_()
        loss = F.cross_entropy(wrapper(x), labels, ignore_index=-100)
        torch.autograd.grad(loss, x)

    def attacked(attack, name):
        def run():
            adv = perturb(wrapper, attack, name, data, labels=labels)
            with torch.no_grad():
                model.test_step(dict(inputs=adv, data_samples=copy.deepcopy(data['data_samples'])))
        return run

    ms = dict(clean=timed(clean, args), forward_backward=timed(forward_backward, args),
              fgsm=timed(attacked(fgsm, 'FGSM'), args),
              pgd=timed(attacked(pgd, pgd_name), args))
    k = args.steps
    result = dict(
        config=args.config, device=str(torch.cuda.get_device_name() if args.device.startswith(
            'cuda') else 'cpu'), size=args.size, batch=args.batch, pgd_steps=k,
        ms_per_batch={key: round(v, 2) for key, v in ms.items()},
        fgsm_over_2_fb=round(ms['fgsm'] / (2 * ms['forward_backward']), 3),
        pgd_over_k_plus_1_fb=round(ms['pgd'] / ((k + 1) * ms['forward_backward']), 3))
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + '\n')


if __name__ == '__main__':
    main()
