"""Typed configuration: recipes load, overrides apply, and every bad value is named."""

from __future__ import annotations

import subprocess
import sys

import pytest

from megatron_timeexpert.config import ConfigError, load_config, parse_override
from parallel.layout import LayoutError, ParallelLayout

TINY = "configs/tiny_moe.yaml"


def test_recipe_and_overrides():
    cfg = load_config(TINY, ["training.lr=3e-4", "parallel.tp=1", "moe.router=topk", "training.save_dir=null"])
    assert cfg.training.lr == pytest.approx(3e-4)
    assert cfg.parallel.tp == 1 and cfg.parallel.pp == 2
    assert cfg.moe.router == "topk"
    assert cfg.training.save_dir is None
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("training.lrr=1", "training.lrr: unknown field"),
        ("training.lr=fast", "training.lr='fast': must be a number"),
        ("training.lr=-1", "training.lr=-1.0: must be > 0"),
        ("moe.router=dense", "moe.router='dense'"),
        ("model.hidden_size=63", "model.hidden_size=63"),
        ("model.num_layers=2.5", "model.num_layers=2.5: must be an integer"),
        ("logging.wandb=maybe", "logging.wandb='maybe': must be true or false"),
        ("training.resume=true", "training.resume=True: needs training.save_dir"),
        ("nosection=1", "must look like section.field"),
    ],
)
def test_bad_values_are_named(override, fragment):
    overrides = [override] + (["training.save_dir=null"] if "resume" in override else [])
    with pytest.raises(ConfigError) as e:
        load_config(TINY, overrides)
    assert fragment in str(e.value)


def test_unknown_key_in_yaml_names_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hiden_size: 8\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: model.hiden_size: unknown field"):
        load_config(bad)


@pytest.mark.parametrize(
    "layout, world, kwargs, fragment",
    [
        (ParallelLayout(tp=2, pp=2), 6, {}, "world size 6 is not divisible by tp*pp"),
        (ParallelLayout(ep=4, pp=2), 4, {}, "not divisible by etp*ep*pp"),
        (ParallelLayout(ep=2), 4, {"num_experts": 3}, "moe.num_experts=3 is not divisible by parallel.ep=2"),
        (ParallelLayout(pp=2), 4, {"num_layers": 3}, "model.num_layers=3 is not divisible by pp*vpp = 2"),
        (ParallelLayout(tp=4), 4, {"num_attention_heads": 6}, "num_attention_heads=6"),
        (ParallelLayout(), 4, {"global_batch_size": 6, "micro_batch_size": 2}, "global_batch_size=6"),
        (ParallelLayout(vpp=2), 2, {}, "parallel.vpp=2 needs parallel.pp > 1"),
        (ParallelLayout(tp=0), 2, {}, "parallel.tp=0"),
    ],
)
def test_invalid_layouts_fail_before_any_group(layout, world, kwargs, fragment):
    # validate() is pure: no process group exists in this test process.
    with pytest.raises(LayoutError) as e:
        layout.validate(world, **kwargs)
    assert fragment in str(e.value)


def test_valid_layout_describes_itself():
    layout = ParallelLayout(tp=2, pp=2, ep=2)
    layout.validate(4, num_layers=4, num_experts=4, num_attention_heads=4, global_batch_size=8, micro_batch_size=2)
    assert layout.describe(4) == "world=4 tp=2 pp=2 ep=2 etp=1 dp=1 vpp=-"


def test_cli_config_and_error_exit_code():
    ok = subprocess.run(
        [sys.executable, "-m", "megatron_timeexpert.cli", "config", "--config", TINY, "parallel.tp=1"],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert "tp: 1" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "megatron_timeexpert.cli", "pretrain", "--config", TINY, "training.lrr=1"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert "training.lrr: unknown field" in bad.stderr
