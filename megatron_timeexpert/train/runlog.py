"""Where a run's log lines go: everything to a per-rank file under ``run_dir``, a readable console.

    setup_run_logging(rank, "runs/tiny_timeexpert")   # once per process, before building the model

- ``run_dir/logs/rank000.log`` (one file per rank) receives every log record at INFO and above from
  every library, and every Python warning (``logging.captureWarnings``): megatron's construction
  dumps (DDP buckets and their parameter lists, config reprs, "falling back to ..." notices), torch's
  deprecation warnings and the like. Read it when something needs explaining.
- The console (stderr) shows our own lines (loggers under ``megatron_timeexpert``, ``parallel``,
  ``dali_pipes``, ``tools``, ``launch``): INFO on rank 0, WARNING elsewhere; from any other library
  only errors. The progress bar and the metric lines are printed by the trainer itself.

No communication. Re-running it (a second run in the same process) replaces the handlers.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

OUR_LOGGERS = ("megatron_timeexpert", "parallel", "dali_pipes", "tools", "launch", "__main__")
_MARK = "_timeexpert_run_handler"


class _ConsoleFilter(logging.Filter):
    """Our loggers at the console level; other libraries only from ERROR up."""

    def __init__(self, ours_level: int):
        super().__init__()
        self.ours_level = ours_level

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name == "root" or record.name.split(".")[0] in OUR_LOGGERS
        return record.levelno >= (self.ours_level if ours else logging.ERROR)


def log_file(run_dir: str | Path, rank: int) -> Path:
    """The log file of ``rank`` in ``run_dir``."""
    return Path(run_dir) / "logs" / f"rank{rank:03d}.log"


def setup_run_logging(rank: int, run_dir: str | Path | None) -> Path | None:
    """Install the file and console handlers (module docstring); returns the log file's path."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, _MARK, False) or not isinstance(h, logging.FileHandler):
            root.removeHandler(h)
    root.setLevel(logging.INFO)
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(name)s: %(message)s", datefmt="%H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    console.addFilter(_ConsoleFilter(logging.INFO if rank == 0 else logging.WARNING))
    setattr(console, _MARK, True)
    root.addHandler(console)
    path = None
    if run_dir is not None:
        path = log_file(run_dir, rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path)
        handler.setFormatter(fmt)
        handler.setLevel(logging.INFO)
        setattr(handler, _MARK, True)
        root.addHandler(handler)
    logging.captureWarnings(True)
    if rank == 0 and path is not None:
        logging.getLogger(__name__).info("full log of this rank (library messages, warnings): %s", path)
    return path
