"""Prediction with a trained TimeExpert model: ``timeexpert predict`` (cli.py), structured event
generation with head switching and a KV cache (generation.py), events -> public prediction formats
(outputs.py, run.py). docs/PREDICT.md describes them."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """``timeexpert predict`` (see :mod:`megatron_timeexpert.predict.cli`)."""
    from megatron_timeexpert.predict.cli import main as cli_main

    return cli_main(argv)
