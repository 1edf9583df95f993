# Test (and evaluate) a checkpoint from an mmengine config (mmsegmentation's
# tools/test.py, plus CPU/gloo multi-process launch; see robustbn.openmmlab.launcher).
import argparse
import os.path as osp

from run_common import add_launch_args, build_runner, load_config, parse

from robustbn.openmmlab.launcher import is_deepspeed


def parse_args():
    parser = argparse.ArgumentParser(description='Test (and eval) a model')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--work-dir',
        help=('if specified, the evaluation metric results will be dumped '
              'into the directory as json'))
    parser.add_argument(
        '--out',
        type=str,
        help='The directory to save output prediction for offline evaluation')
    parser.add_argument(
        '--show', action='store_true', help='show prediction results')
    parser.add_argument(
        '--show-dir',
        help='directory where painted images will be saved. '
        'If specified, it will be automatically saved '
        'to the work_dir/timestamp/show_dir')
    parser.add_argument(
        '--wait-time', type=float, default=2, help='the interval of show (s)')
    parser.add_argument(
        '--tta', action='store_true', help='Test time augmentation')
    add_launch_args(parser)
    return parse(parser)


def trigger_visualization_hook(cfg, args):
    default_hooks = cfg.default_hooks
    if 'visualization' not in default_hooks:
        raise RuntimeError(
            'VisualizationHook must be included in default_hooks; '
            'e.g. visualization=dict(type=\'SegVisualizationHook\')')
    visualization_hook = default_hooks['visualization']
    visualization_hook['draw'] = True
    if args.show:
        visualization_hook['show'] = True
        visualization_hook['wait_time'] = args.wait_time
    if args.show_dir:
        cfg.visualizer['save_dir'] = args.show_dir
    return cfg


def main():
    args = parse_args()

    # work_dir: --work-dir > the config's > ./work_dirs/CONFIG_NAME
    cfg = load_config(args.config, args)

    if osp.isdir(args.checkpoint):
        # DeepSpeed's engine cannot be built without an optimizer under ZeRO 1-2.
        raise SystemExit(
            f'{args.checkpoint} is a DeepSpeed checkpoint directory; export the model first:\n'
            f'  python tools/export_deepspeed_checkpoint.py {args.checkpoint}\n'
            'and test the .pth it writes.')
    cfg.load_from = args.checkpoint
    if is_deepspeed(cfg):
        # Testing needs no DeepSpeed: the plain Runner evaluates the exported weights.
        cfg.pop('runner_type')
        cfg.pop('strategy')

    if args.show or args.show_dir:
        cfg = trigger_visualization_hook(cfg, args)

    if args.tta:
        if 'tta_model' not in cfg or 'tta_pipeline' not in cfg:
            raise ValueError('--tta needs tta_model and tta_pipeline in the config')
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
        cfg.tta_model.module = cfg.model
        cfg.model = cfg.tta_model

    # save the predictions for offline evaluation
    if args.out is not None:
        cfg.test_evaluator['output_dir'] = args.out
        cfg.test_evaluator['keep_results'] = True

    build_runner(cfg).test()


if __name__ == '__main__':
    main()
