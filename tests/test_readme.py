"""README.md keeps exactly two set-up commands, and .ci/run runs the test one verbatim."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_two_setup_commands_and_ci_runs_the_second():
    commands = _setup_commands()
    assert len(commands) == 2, commands
    main_job, tests = commands
    assert "tools.main_job" in main_job and main_job.startswith("bash launch/install.sh")
    assert "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci, f".ci/run must run README's test command {tests!r}"


def test_main_job_recipes_are_the_promised_layout():
    from megatron_timeexpert.config import load_config
    from tools.main_job import main

    assert main.__module__ == "tools.main_job"
    for name in ("tiny_moe", "timeexpert_stage1", "timeexpert_stage2", "timeexpert_stage3"):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        assert (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep, cfg.parallel.etp) == (2, 2, 2, 1), name
        assert cfg.training.save_dir, "the main job must write a checkpoint"
        cfg.validate(world_size=4)


def test_every_recipe_loads_and_fits_four_processes():
    from megatron_timeexpert.config import load_config

    recipes = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(recipes) >= 2
    for path in recipes:
        load_config(path).validate(world_size=4)


def test_cpu_doc_lists_every_shim():
    from parallel.cpu_compat import SHIMS

    doc = (ROOT / "docs" / "CPU.md").read_text()
    missing = [s.name for s in SHIMS if f"`{s.name}`" not in doc]
    assert not missing, f"docs/CPU.md does not describe shims {missing}"
