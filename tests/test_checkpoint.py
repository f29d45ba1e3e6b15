"""Checkpoints: a writer killed mid-save leaves a partial folder that resume skips; the newest
complete checkpoint is loaded and training continues exactly as an uninterrupted run."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from megatron_timeexpert.train.checkpoint import KILL_DURING_SAVE_ENV, MARKER, complete_checkpoints, latest_checkpoint
from parallel.testing import DistributedRunError
from tests.dist_runs import tiny_config, train


def _fake(path, step, marker):
    path.mkdir(parents=True)
    (path / "shard.distcp").write_bytes(b"x")
    if marker is not None:
        (path / MARKER).write_text(marker if isinstance(marker, str) else json.dumps(marker))


def test_latest_skips_incomplete_and_corrupt(tmp_path, caplog):
    _fake(tmp_path / "iter_0000003", 3, {"step": 3})
    _fake(tmp_path / "iter_0000005", 5, None)  # no marker: cut off before completion
    _fake(tmp_path / "iter_0000007", 7, "{not json")  # torn marker
    _fake(tmp_path / "iter_0000008", 8, {"step": 2})  # marker of another step
    _fake(tmp_path / ".tmp-iter_0000009", 9, None)  # a save in progress or killed
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(tmp_path) == tmp_path / "iter_0000003"
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [3]
    for name in ("iter_0000005", "iter_0000007", "iter_0000008", ".tmp-iter_0000009"):
        assert name in caplog.text, f"no warning names {name}"
    assert latest_checkpoint(tmp_path / "missing") is None


@pytest.mark.slow
def test_killed_writer_checkpoint_is_skipped_on_resume(tmp_path):
    layout = (1, 1, 2)  # two processes: dp=2, ep=2
    straight = train(tiny_config(tmp_path / "a", *layout, "training.train_steps=4"), 2).losses

    save_dir = tmp_path / "ckpt"
    cfg = tiny_config(
        tmp_path / "b", *layout, "training.train_steps=4", "training.save_interval=2", f"training.save_dir={save_dir}"
    )
    with pytest.raises(DistributedRunError, match="exited with code -9|exited with code"):
        train(cfg, 2, env={KILL_DURING_SAVE_ENV: "4"})
    partial = save_dir / ".tmp-iter_0000004"
    assert partial.is_dir() and any(partial.glob("*.distcp")), "the kill should leave written shards behind"
    assert not (partial / MARKER).exists()
    assert latest_checkpoint(save_dir) == save_dir / "iter_0000002"

    resumed = train(
        tiny_config(
            tmp_path / "c", *layout, "training.train_steps=4", f"training.save_dir={save_dir}", "training.resume=true"
        ),
        2,
    )
    assert resumed.first_step == 2
    assert resumed.losses == straight[2:]
    assert latest_checkpoint(save_dir) == save_dir / "iter_0000004"
    assert not partial.exists(), "the next save removes the partial folder"

    # A downloaded checkpoint whose RNG file was replaced by a pickle that runs code is refused by
    # every rank with an error naming the file; the payload never runs.
    victim = tmp_path / "pwned"
    torch.save(
        {"torch": torch.zeros(1), "payload": _RunsCode(victim)}, save_dir / "iter_0000004" / "rng" / "rank_00001.pt"
    )
    with pytest.raises(DistributedRunError, match="UnsafeCheckpointError: .*rank_00001.pt: refusing to load it"):
        train(
            tiny_config(
                tmp_path / "d",
                *layout,
                "training.train_steps=6",
                f"training.save_dir={save_dir}",
                "training.resume=true",
            ),
            2,
        )
    assert not victim.exists(), "the pickle ran code"


class _RunsCode:
    """A pickle payload that would run code when unpickled (it would create the file ``path``)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_loading_refuses_pickles_that_run_code(tmp_path):
    """RNG files and an old-style train_state.pt holding arbitrary objects are refused with an error
    naming the file, and the payload never runs; plain tensors and containers load."""
    import torch

    from megatron_timeexpert.train.checkpoint import UnsafeCheckpointError, _read_train_state, _safe_torch_load

    victim = tmp_path / "pwned"
    evil = tmp_path / "rank_00000.pt"
    torch.save({"torch": torch.zeros(3), "payload": _RunsCode(victim)}, evil)
    with pytest.raises(UnsafeCheckpointError, match="rank_00000.pt: refusing to load it"):
        _safe_torch_load(evil)
    assert not victim.exists(), "the pickle ran code"

    old = tmp_path / "old_ckpt"
    old.mkdir()
    torch.save({"step": 3, "payload": _RunsCode(victim)}, old / "train_state.pt")
    with pytest.raises(UnsafeCheckpointError, match="train_state.pt"):
        _read_train_state(old)
    assert not victim.exists()

    good = tmp_path / "good.pt"
    torch.save({"torch": torch.arange(4), "tracker": {"model-parallel-rng": torch.ones(2)}}, good)
    assert torch.equal(_safe_torch_load(good)["torch"], torch.arange(4))
