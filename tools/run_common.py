# What the run tools (train.py, test.py, adv_test.py, tta_test.py) share: the launcher
# arguments and LOCAL_RANK, loading a config with --cfg-options (its norm_cfg types checked), the
# work-dir rule and building a Runner (CPU/gloo launch included). One place for CLI-to-config
# logic.
import difflib
import os
import os.path as osp

from mmengine.config import Config, DictAction
from mmengine.registry import MODELS, RUNNERS
from mmengine.runner import Runner
from torch import nn

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
    check_norm_types(cfg, config)
    return cfg


# ------------------------------------------------------------------ norm_cfg types
NORM_CLASSES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _norm_cfgs(node, path):
    """(key path, type) of every ``*norm_cfg`` dict with a string type under ``node``."""
    items = node.items() if isinstance(node, dict) else \
        enumerate(node) if isinstance(node, (list, tuple)) else ()
    for key, value in items:
        sub = f'{path}.{key}' if isinstance(key, str) else f'{path}[{key}]'
        if isinstance(key, str) and key.endswith('norm_cfg') and isinstance(value, dict) \
                and isinstance(value.get('type'), str):
            yield sub, value['type']
        else:
            yield from _norm_cfgs(value, sub)


def _registered_norms(registry):
    """{name: class} of the norm layers ``registry`` and its parents hold."""
    names = {}
    while registry is not None:
        for name, cls in registry.module_dict.items():
            if isinstance(cls, type) and issubclass(cls, NORM_CLASSES):
                names.setdefault(name, cls)
        registry = registry.parent
    return names


def check_norm_types(cfg: Config, config: str = 'the config') -> None:
    """Every ``norm_cfg`` type in ``cfg.model`` must be registered: mmcv's
    ``build_norm_layer`` would stop with ``KeyError: 'Cannot find None in registry'``,
    which names neither the type nor the key. Raises a ValueError that names both, the
    closest registered names and robustbn's norm layers."""
    found = list(_norm_cfgs(cfg.get('model') or {}, 'model'))
    if not found:
        return
    with MODELS.switch_scope_and_registry(cfg.get('default_scope')) as registry:
        unknown = []
        for path, name in found:
            try:
                known = registry.get(name) is not None
            except RuntimeError:  # a dotted name that does not resolve
                known = False
            if not known:
                unknown.append((path, name))
        if not unknown:
            return
        norms = _registered_norms(registry)
    ours = [n for n, c in norms.items() if c.__module__.split('.')[0] == 'robustbn']
    others = sorted(n for n in norms if n not in ours)
    by_lower = {n.lower(): n for n in norms}
    lines = []
    for path, name in unknown:
        close = [by_lower[m] for m in difflib.get_close_matches(name.lower(), by_lower, 3)]
        hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ''
        lines.append(f'  {path}.type = {name!r}{hint}')
    raise ValueError(
        f'{config}: unknown norm layer type in norm_cfg:\n' + '\n'.join(lines) +
        f"\nrobustbn's norm layers: {', '.join(ours) or 'none registered'}"
        f"\nother registered norm layers: {', '.join(others)}"
        '\n(names are case-sensitive; layers of other packages need their import, e.g. '
        "custom_imports=dict(imports=['robustbn']) in a config run without these tools)")


def build_runner(cfg: Config):
    """Runner (or the config's runner_type, e.g. FlexibleRunner, from mmengine's root
    registry); without CUDA a gloo process group and CPU DDP first (no-op otherwise)."""
    setup_cpu_distributed(cfg)
    return Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
