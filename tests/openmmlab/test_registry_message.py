"""Configs that name robustbn's layers: the README's fix for configs built without
robustbn imported, and the tools' clear error for a misspelt norm type.

Without ``custom_imports=dict(imports=['robustbn'])`` (or ``import robustbn``) a plain
mmengine Runner does not know ``SyncJSBN``, and mmcv's ``build_norm_layer`` stops with
``KeyError: 'Cannot find None in registry ...'``, naming neither the type nor the key. The
tools import robustbn, and tools/run_common.py's ``load_config`` checks every ``norm_cfg``
type of the model before the Runner is built.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap

import pytest
from helpers import ROOT, TIMEOUT, load_tool, start, tool_env

from robustbn.jsbn import SyncJSBN

run_common = load_tool('run_common')

SEG_CONFIG = ROOT / 'configs' / 'seg' / 'fcn_hr18_4xb2-40k_cityscapes-512x1024_syncjsbn.py'
CONFIGS = sorted(p for p in (ROOT / 'configs').rglob('*.py') if '_base_' not in p.parts)

# A small mmseg model whose backbone and head take the norm layer; built by a plain Runner.
USER_SCRIPT = textwrap.dedent("""
    import sys
    from mmengine.config import Config
    from mmengine.runner import Runner

    model = dict(
        type='EncoderDecoder',
        backbone=dict(type='ResNetV1c', depth=18, norm_cfg=dict(type='SyncJSBN')),
        decode_head=dict(type='FCNHead', in_channels=512, channels=8, num_classes=3,
                         in_index=3, norm_cfg=dict(type='SyncJSBN')))
    base = dict(model=model, default_scope='mmseg', work_dir=sys.argv[1])

    # 1. robustbn neither imported nor in custom_imports: mmcv's unhelpful KeyError.
    try:
        Runner.from_cfg(Config(dict(base, experiment_name='without')))
    except KeyError as err:
        print('WITHOUT:', err)
    assert 'robustbn' not in sys.modules

    # 2. The README's fix: the custom_imports line in the config file.
    with open(sys.argv[2], 'w') as f:
        f.write("custom_imports = dict(imports=['robustbn'], allow_failed_imports=False)\\n")
        f.write(f'model = {model!r}\\n')
        f.write(f"default_scope = 'mmseg'\\nwork_dir = {sys.argv[1]!r}\\n")
    cfg = Config.fromfile(sys.argv[2])
    runner = Runner.from_cfg(cfg)
    names = sorted({type(m).__name__ for m in runner.model.modules()
                    if type(m).__module__.startswith('robustbn')})
    print('WITH:', names)
""")


def test_without_import_fails_and_custom_imports_fixes_it(tmp_path):
    script = tmp_path / 'user_script.py'
    script.write_text(USER_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / 'work'),
                           str(tmp_path / 'user_cfg.py')], cwd=tmp_path, env=tool_env(),
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "WITHOUT: 'Cannot find None in registry under scope name mmseg'" in proc.stdout
    assert "WITH: ['SyncJSBN']" in proc.stdout


def test_tool_names_misspelt_norm_type_before_the_runner(tmp_path):
    work = tmp_path / 'work'
    proc = start([sys.executable, 'tools/train.py', SEG_CONFIG, '--work-dir', work,
                  '--cfg-options', 'model.backbone.norm_cfg.type=SyncJSbn'])
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 1
    assert "model.backbone.norm_cfg.type = 'SyncJSbn' (did you mean 'SyncJSBN'" in err
    assert "robustbn's norm layers: JSBN, GpreBN, JSBN1d" in err and 'SyncJSBN' in err
    assert 'Cannot find None' not in err
    assert not work.exists()  # stopped before the Runner (which makes the work dir)


def load(config, *options):
    args = argparse.Namespace(launcher='none', cfg_options=None, work_dir=None)
    if options:
        args.cfg_options = dict(o.split('=', 1) for o in options)
    return run_common.load_config(str(config), args)


def test_check_in_load_config(tmp_path):
    with pytest.raises(ValueError) as info:
        load(SEG_CONFIG, 'model.decode_head.norm_cfg.type=JsBN')
    msg = str(info.value)
    assert str(SEG_CONFIG) in msg and "model.decode_head.norm_cfg.type = 'JsBN'" in msg
    assert "'JSBN'" in msg.splitlines()[1]
    assert 'backbone' not in msg  # the valid key is not reported
    # fixed by --cfg-options: checked after the options are merged
    cfg = load(SEG_CONFIG, 'model.decode_head.norm_cfg.type=JSBN')
    assert cfg.model.decode_head.norm_cfg.type == 'JSBN'


def test_check_scopes_lists_and_unusual_types():
    from mmengine.config import Config
    # mmengine scope (no default_scope): robustbn's layers, mmcv's, dotted paths, classes
    good = Config(dict(model=dict(type='X', layers=[
        dict(norm_cfg=dict(type='SyncJSBN')), dict(norm_cfg=dict(type='GN')),
        dict(head=dict(out_norm_cfg=dict(type='torch.nn.BatchNorm2d'))),
        dict(norm_cfg=dict(type=SyncJSBN)), dict(norm_cfg=None)])))
    run_common.check_norm_types(good)
    bad = Config(dict(model=dict(type='X', layers=[
        dict(norm_cfg=dict(type='SyncJSBN')),
        dict(head=dict(out_norm_cfg=dict(type='torch.nn.BatchNrm2d')))])))
    with pytest.raises(ValueError, match=r"model\.layers\[1\]\.head\.out_norm_cfg\.type = "
                                         r"'torch\.nn\.BatchNrm2d'"):
        run_common.check_norm_types(bad)
    # a top-level norm_cfg variable that the model does not use is not checked
    run_common.check_norm_types(Config(dict(norm_cfg=dict(type='Nope'), model=dict(type='X'))))


@pytest.mark.parametrize('config', CONFIGS, ids=lambda p: f'{p.parent.name}/{p.name}')
def test_every_config_passes_the_check(config):
    load(config)
