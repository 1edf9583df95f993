# What the run tools (train.py, test.py, adv_test.py, tta_test.py) share: the launcher
# arguments and LOCAL_RANK, loading a config with --cfg-options, the work-dir rule and
# building a Runner (CPU/gloo launch included). One place for CLI-to-config logic.
import os
import os.path as osp

from mmengine.config import Config, DictAction
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from robustbn.openmmlab.launcher import setup_cpu_distributed

CFG_OPTIONS_HELP = (
    'override some settings in the used config, the key-value pair in xxx=yyy format will '
    'be merged into config file. If the value to be overwritten is a list, it should be '
    'like key="[a,b]" or key=a,b It also allows nested list/tuple values, e.g. '
    'key="[(a,b),(c,d)]" Note that the quotation marks are necessary and that no white '
    'space is allowed.')


def add_launch_args(parser, cfg_options_help: str = CFG_OPTIONS_HELP) -> None:
    """--cfg-options, --launcher and --local_rank/--local-rank."""
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, help=cfg_options_help)
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    # torch.distributed.launch passes --local-rank (torch >= 2.0) or --local_rank;
    # torchrun sets LOCAL_RANK instead.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def parse(parser, argv=None):
    """parser.parse_args, then LOCAL_RANK from --local-rank unless a launcher set it."""
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def default_work_dir(config: str, root: str = './work_dirs') -> str:
    return osp.join(root, osp.splitext(osp.basename(config))[0])


def load_config(config: str, args, work_dir: bool = True) -> Config:
    """The config with the launcher and --cfg-options applied; with ``work_dir``, its
    work_dir by priority: --work-dir > the config's > ./work_dirs/CONFIG_NAME."""
    cfg = Config.fromfile(config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if work_dir:
        if getattr(args, 'work_dir', None) is not None:
            cfg.work_dir = args.work_dir
        elif cfg.get('work_dir', None) is None:
            cfg.work_dir = default_work_dir(config)
    return cfg


def build_runner(cfg: Config):
    """Runner (or the config's runner_type, e.g. FlexibleRunner, from mmengine's root
    registry); without CUDA a gloo process group and CPU DDP first (no-op otherwise)."""
    setup_cpu_distributed(cfg)
    return Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
