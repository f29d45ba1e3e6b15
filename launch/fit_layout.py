"""Fit a recipe's parallel layout to the ranks a (re)launched job actually got.

    python -m launch.fit_layout --config configs/tiny_timeexpert.yaml --world 2 [overrides ...]
    # prints one override per line, e.g. "parallel.ep=2", or nothing when the layout already fits

A job that lost a node can continue on fewer ranks without waiting for a replacement: checkpoints
reshard across layouts (docs/LAUNCH.md), so only the data-parallel size (derived) and the
expert-parallel size must shrink. TP and PP stay as in the recipe (they are set by the model's memory
needs); EP is lowered to the largest size that divides the experts and fits the smaller DP; growing
back later is the same call with a larger world. Exit status 2 with a message when the world cannot
hold the recipe's TP x PP at all. Pure logic, no process group.
"""

from __future__ import annotations

import argparse
import sys

from megatron_timeexpert.config import Config, ConfigError, load_config


def fit_overrides(cfg: Config, world: int) -> list[str]:
    """Overrides (``parallel.ep=N``) that make ``cfg`` valid on ``world`` ranks; [] if it already is."""
    try:
        cfg.validate(world)
        return []
    except ConfigError:
        pass
    p = cfg.parallel
    for ep in range(p.ep, 0, -1):
        p.ep = ep
        try:
            cfg.validate(world)
            return [f"parallel.ep={ep}"]
        except ConfigError:
            continue
    p.ep = 1
    cfg.validate(world)  # raises the reason no expert-parallel size fits (e.g. TP x PP > world)
    return ["parallel.ep=1"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.fit_layout", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--world", type=int, required=True, help="ranks the job has")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    try:
        for line in fit_overrides(load_config(args.config, args.overrides), args.world):
            print(line)
    except ConfigError as e:
        print(f"fit_layout: the recipe cannot run on {args.world} ranks: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
