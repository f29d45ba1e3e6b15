"""Atomic, layout-independent checkpoints on megatron-core distributed checkpointing.

Layout on disk (``save_dir``)::

    iter_0000010/            complete checkpoint of step 10
        COMPLETE             json marker, written last (step, layout, time)
        train_state.json     step, consumed samples, LR scheduler, config (rank 0; plain JSON)
        rng/rank_00003.pt    per-rank RNG states, tensors only (restored only into the same world size)
        ...                  megatron dist_checkpointing shards: model + optimizer state
    .tmp-iter_0000012/       a save that was cut off: never loaded, removed by the next save
    latest                   text file naming the newest complete checkpoint (a hint only)

Atomicity: every rank writes into ``.tmp-iter_N``; after a barrier rank 0 writes ``COMPLETE`` and
renames the folder to ``iter_N`` (an atomic rename on POSIX). A loader only considers folders named
``iter_N`` that contain a valid ``COMPLETE`` marker, so a writer killed at any point leaves the
newest complete checkpoint as the one that is loaded.

Loading never unpickles arbitrary objects: the train state is JSON, RNG states are saved as a dict
of tensors and read with ``torch.load(weights_only=True)``, which refuses anything else (a downloaded
checkpoint cannot run code on the machine that loads it; :class:`UnsafeCheckpointError` names the
file). Checkpoints of earlier versions kept the train state in ``train_state.pt``; it is read the
same safe way.

Model and optimizer state are ``ShardedTensor``s keyed by global parameter names, so a checkpoint
written at one (TP, PP, EP, VPP) layout loads at any other. Communication: ``save``/``load`` are
collectives over all ranks (megatron's dist_checkpointing exchanges shard metadata; barriers
around the rename).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_timeexpert.train import distopt

log = logging.getLogger(__name__)

_ITER = re.compile(r"^iter_(\d{7})$")
MARKER = "COMPLETE"
# Fault injection for tests: kill this process after the shards of this step are written but
# before the checkpoint is marked complete.
KILL_DURING_SAVE_ENV = "TIMEEXPERT_FAULT_KILL_DURING_SAVE"


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds pickled objects beyond tensors and plain containers; it is not loaded."""


def _safe_torch_load(file: Path) -> Any:
    """``torch.load(weights_only=True)``: tensors, numbers, strings, lists and dicts only."""
    import pickle

    try:
        return torch.load(file, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{file}: refusing to load it: it holds pickled objects other than tensors and plain containers, "
            f"which could run code on this machine (torch.load(weights_only=True) said: {str(e).splitlines()[0]}). "
            "Checkpoints written by megatron-timeexpert never do; was this file replaced?"
        ) from None


def _read_train_state(path: Path) -> dict[str, Any]:
    """The rank-0 train state: ``train_state.json``, or the older ``train_state.pt`` read safely."""
    js = path / "train_state.json"
    if js.is_file():
        return json.loads(js.read_text())
    old = path / "train_state.pt"
    if old.is_file():
        return _safe_torch_load(old)
    raise FileNotFoundError(f"{path} has no train_state.json")


@dataclass
class TrainState:
    """Progress that a checkpoint restores besides weights and optimizer state."""

    step: int = 0
    consumed_samples: int = 0


def checkpoint_name(step: int) -> str:
    return f"iter_{step:07d}"


def complete_checkpoints(save_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint in ``save_dir``, oldest first.

    Folders without a valid marker (a cut-off save, a copy in progress) are skipped with a
    warning naming them and why.
    """
    save_dir = Path(save_dir)
    found = []
    if not save_dir.is_dir():
        return found
    for path in sorted(save_dir.iterdir()):
        m = _ITER.match(path.name)
        if not m:
            if path.name.startswith(".tmp-iter_"):
                log.warning("checkpoint %s is incomplete (the writer stopped mid-save): skipped", path)
            continue
        marker = path / MARKER
        try:
            meta = json.loads(marker.read_text())
            if int(meta["step"]) != int(m.group(1)):
                raise ValueError(f"marker step {meta['step']} != folder step {m.group(1)}")
        except FileNotFoundError:
            log.warning("checkpoint %s has no %s marker: skipped", path, MARKER)
            continue
        except (ValueError, KeyError, json.JSONDecodeError) as e:
            log.warning("checkpoint %s has an unreadable %s marker (%s): skipped", path, MARKER, e)
            continue
        found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(save_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in ``save_dir``, or None."""
    found = complete_checkpoints(save_dir)
    return found[-1][1] if found else None


def optimizer_sharded_state(optimizer, model_sd: dict[str, Any], is_loading: bool = False) -> dict[str, Any]:
    """The optimizer's ``sharded_state_dict`` against ``model_sd`` (what a checkpoint stores of it)."""
    distopt.ensure_state(optimizer)  # a DistributedOptimizer before its first step (train/distopt.py)
    return optimizer.sharded_state_dict(_flat(model_sd), is_loading=is_loading, metadata=distopt.checkpoint_metadata())


def model_sharded_state(models: list[torch.nn.Module]) -> dict[str, Any]:
    """Every chunk's ``sharded_state_dict`` (what a checkpoint stores of the model), by chunk."""
    # Keys inside the ShardedTensors are global parameter names, so "model0"/"model1" (virtual
    # stages) only group them; a different vpp at load time regroups them.
    return {f"model{i}": _unwrap(m).sharded_state_dict() for i, m in enumerate(models)}


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def _rng_state() -> dict[str, Any]:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    save_dir: str | Path,
    train_state: TrainState,
    models: list[torch.nn.Module],
    optimizer,
    scheduler,
    extra: dict[str, Any] | None = None,
    keep_last: int = 3,
) -> Path:
    """Write checkpoint ``iter_<step>`` atomically; collective over all ranks. Returns its path."""
    from megatron.core import dist_checkpointing

    save_dir = Path(save_dir)
    rank = dist.get_rank()
    name = checkpoint_name(train_state.step)
    tmp, final = save_dir / f".tmp-{name}", save_dir / name
    if rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        for stale in save_dir.glob(".tmp-iter_*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it
            shutil.rmtree(final)
        tmp.mkdir()
    dist.barrier()
    t0 = time.perf_counter()
    model_sd = model_sharded_state(models)
    state = dict(model_sd)
    state["optimizer"] = optimizer_sharded_state(optimizer, model_sd)
    dist_checkpointing.save(state, str(tmp))
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(_rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
    if rank == 0:
        meta = {
            "step": train_state.step,
            "consumed_samples": train_state.consumed_samples,
            "scheduler": scheduler.state_dict(),
            "world_size": dist.get_world_size(),
            **(extra or {}),
        }
        (tmp / "train_state.json").write_text(json.dumps(meta, indent=1))
    dist.barrier()
    if os.environ.get(KILL_DURING_SAVE_ENV) == str(train_state.step):
        log.error("fault injection: killing rank %d during the save of step %d", rank, train_state.step)
        os.kill(os.getpid(), signal.SIGKILL)
    if rank == 0:
        marker = {"step": train_state.step, "world_size": dist.get_world_size(), "time": time.time()}
        with open(tmp / MARKER, "w") as f:
            json.dump(marker, f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, final)
        _write_latest(save_dir, name)
        for _, old in complete_checkpoints(save_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("saved checkpoint %s in %.1fs", final, time.perf_counter() - t0)
    dist.barrier()
    return final


def _write_latest(save_dir: Path, name: str) -> None:
    tmp = save_dir / ".latest.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, save_dir / "latest")


def _flat(model_sd: dict[str, Any]) -> dict[str, Any]:
    """All chunks' sharded tensors in one dict for the optimizer's param mapping. Local names
    repeat across virtual stages (each chunk has its own ``decoder.layers.0``), so keep them apart."""
    return {f"{chunk}.{k}": v for chunk, sd in model_sd.items() for k, v in sd.items()}


def load_checkpoint(
    path: str | Path,
    models: list[torch.nn.Module],
    optimizer=None,
    scheduler=None,
) -> tuple[TrainState, dict[str, Any]]:
    """Load weights (and optimizer, scheduler, RNG when given and saved) from ``path``.

    Works across layouts; RNG states are restored only when the world size is unchanged (they are
    per rank). Returns the restored :class:`TrainState` and the saved extra dict. Collective.
    """
    from megatron.core import dist_checkpointing

    path = Path(path)
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER} marker)")
    model_sd = model_sharded_state(models)
    state = dict(model_sd)
    if optimizer is not None:
        state["optimizer"] = optimizer_sharded_state(optimizer, model_sd, is_loading=True)
    loaded = dist_checkpointing.load(state, str(path))
    for i, model in enumerate(models):
        _unwrap(model).load_state_dict(loaded[f"model{i}"])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    meta = _read_train_state(path)
    if scheduler is not None:
        scheduler.load_state_dict(meta["scheduler"])
    rng = path / "rng" / f"rank_{dist.get_rank():05d}.pt"
    if optimizer is not None and meta.get("world_size") == dist.get_world_size() and rng.is_file():
        _set_rng_state(_safe_torch_load(rng))
    if dist.get_rank() == 0:
        log.info("loaded checkpoint %s (step %d)", path, meta["step"])
    return TrainState(meta["step"], meta["consumed_samples"]), meta
