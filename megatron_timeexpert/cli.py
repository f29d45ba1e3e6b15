"""The ``timeexpert`` command.

    timeexpert pretrain --config configs/tiny_moe.yaml --nproc 4          # local CPU/GPU processes
    torchrun --nproc-per-node 8 -m megatron_timeexpert.cli pretrain --config X training.lr=3e-4
    timeexpert config --config configs/tiny_moe.yaml parallel.tp=1        # print the resolved config
    timeexpert eval --task charades --pred P.json --gt G.txt               # score predictions (no GPU, no ranks)
    timeexpert tokenizer train --corpus a.txt --vocab-size 512 --out tok  # sentencepiece text tokenizer
    timeexpert placement-sim --loads zipf --experts 256 --ep 16           # placement planner simulator
    timeexpert diagnose --config R.yaml --checkpoint DIR --data ROOT      # frame-specific visual tokens?

The last three are self-contained: each is a module with ``main(argv) -> int`` (see ``SUBTOOLS``),
so ``timeexpert eval --help`` shows that module's own options.

Overrides are ``section.field=value`` (YAML scalars). ``--resume`` continues from the newest
complete checkpoint in ``training.save_dir``. ``--nproc N`` starts N local processes through
torchrun when the command is not already running under a launcher (torchrun, srun, mpirun).
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys

import yaml

from megatron_timeexpert.config import ConfigError, load_config

# Subcommands that own their argument parsing: name -> module with ``main(argv: list[str]) -> int``.
SUBTOOLS = {
    "eval": "megatron_timeexpert.eval.cli",
    "tokenizer": "megatron_timeexpert.data.tokenizer",
    "placement-sim": "tools.placement_sim",
    "predict": "megatron_timeexpert.predict",
    "diagnose": "tools.diagnose",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="timeexpert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("pretrain", help="pretrain an MoE model (synthetic data for now)")
    pre.add_argument("--config", required=True, help="YAML recipe, e.g. configs/tiny_moe.yaml")
    pre.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    pre.add_argument("--nproc", type=int, default=None, help="start this many local processes via torchrun")
    pre.add_argument("overrides", nargs="*", help="section.field=value overrides")
    show = sub.add_parser("config", help="print the resolved configuration")
    show.add_argument("--config", required=True)
    show.add_argument("overrides", nargs="*")
    for name, module in SUBTOOLS.items():
        sub.add_parser(name, help=f"see `timeexpert {name} --help` ({module})", add_help=False)
    return p


def _under_launcher() -> bool:
    return any(k in os.environ for k in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK"))


def _relaunch(nproc: int, argv: list[str]) -> int:
    """Re-run this command under torchrun with ``nproc`` local processes."""
    args = []
    skip_value = False
    for a in argv:  # drop "--nproc N" and "--nproc=N"
        if skip_value:
            skip_value = False
        elif a == "--nproc":
            skip_value = True
        elif not a.startswith("--nproc="):
            args.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    cmd += ["--master-port", os.environ.get("MASTER_PORT", "29531"), "-m", "megatron_timeexpert.cli", *args]
    print(f"timeexpert: launching {nproc} processes: {' '.join(cmd)}", flush=True)
    env = dict(os.environ)
    # torchrun sets 1 thread per process anyway and prints a banner saying so unless it is set.
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.call(cmd, env=env)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBTOOLS:
        return int(importlib.import_module(SUBTOOLS[argv[0]]).main(argv[1:]) or 0)
    args = _parser().parse_args(argv)
    overrides = list(args.overrides)
    try:
        if args.command == "config":
            print(yaml.safe_dump(load_config(args.config, overrides).to_dict(), sort_keys=False))
            return 0
        if args.resume:
            overrides.append("training.resume=true")
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"timeexpert: configuration error: {e}", file=sys.stderr)
        return 2
    if args.nproc and args.nproc > 1 and not _under_launcher():
        return _relaunch(args.nproc, argv)

    from parallel.env import discover, init_distributed

    dist_env = discover()
    from megatron_timeexpert.train.runlog import setup_run_logging

    # Library messages and warnings go to run_dir/logs/rankNNN.log; the console keeps our lines.
    setup_run_logging(dist_env.rank, cfg.logging.run_dir)
    init_distributed(dist_env, timeout_s=cfg.parallel.collective_timeout_s)
    try:
        cfg.validate(dist_env.world_size)
    except ConfigError as e:
        if dist_env.rank == 0:
            print(f"timeexpert: configuration error: {e}", file=sys.stderr)
        return 2
    from megatron_timeexpert.train.pretrain import pretrain

    result = pretrain(cfg)
    if dist_env.rank == 0 and result.losses:
        print(
            f"timeexpert: finished {len(result.losses)} steps, loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}"
            + (f", checkpoint {result.checkpoint}" if result.checkpoint else ""),
            flush=True,
        )
    import torch.distributed as dist

    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
