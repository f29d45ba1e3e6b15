"""Mixed precision for the trainer: bf16 model chunks whose routers stay fp32.

``training.precision=bf16`` follows megatron's recipe: layers are built in bf16
(``TransformerConfig.params_dtype``), each model chunk is wrapped in megatron-core's
``Float16Module`` (which casts every floating-point parameter and buffer to bf16, casts floating
inputs of the first pipeline stage to bf16 and the outputs of the last stage back to fp32), and
megatron's optimizer (``OptimizerConfig.bf16``) keeps fp32 main weights and Adam moments, reduces
gradients in fp32 (``grad_reduce_in_fp32``) and copies the updated weights back into bf16.

What ``Float16Module`` must NOT convert: our routers (``router`` of each TimeExpert MoE layer).
Their gate weights and thresholds stay fp32 (the routers compute scores in fp32; a threshold
compared with a bf16-rounded score would flip routing decisions), and their routing records keep
float64 counts and sums (counts must stay exact; bf16 holds integers exactly only up to 256).
``Float16Module.__init__`` calls ``module.bfloat16()`` on the whole chunk and offers no exclusion,
so :func:`wrap_bf16` snapshots every parameter and buffer of the kept modules before the wrap and
puts the snapshot back afterwards: same dtype, same values bit for bit, same ``Parameter`` objects
(attributes such as ``sequence_parallel`` survive). This happens before DDP builds its buffers, so
DDP and the optimizer see fp32 router parameters (megatron keeps fp32 parameters as their own
main weights) next to bf16 ones. No communication.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

log = logging.getLogger(__name__)


def _snapshot(modules: Iterable[nn.Module]) -> list[tuple[nn.Module, str, str, torch.Tensor]]:
    """(owner module, '_parameters' or '_buffers', name, detached copy) of every tensor under ``modules``."""
    saved = []
    for top in modules:
        for owner in top.modules():
            for kind in ("_parameters", "_buffers"):
                for name, t in getattr(owner, kind).items():
                    if t is not None:
                        saved.append((owner, kind, name, t.detach().clone()))
    return saved


def _restore(saved: list[tuple[nn.Module, str, str, torch.Tensor]]) -> None:
    for owner, kind, name, copy in saved:
        if kind == "_parameters":
            owner._parameters[name].data = copy  # keeps the Parameter object and its attributes
        else:
            owner._buffers[name] = copy


def wrap_bf16(chunk: nn.Module, tconfig, keep: Iterable[nn.Module] = ()) -> nn.Module:
    """``Float16Module(tconfig, chunk)`` (``tconfig.bf16`` must be set) with every parameter and
    buffer under the modules in ``keep`` left in its original dtype and value."""
    from megatron.core.transformer.module import Float16Module

    if not tconfig.bf16:
        raise ValueError("wrap_bf16 needs a TransformerConfig with bf16=True (training.precision=bf16)")
    saved = _snapshot(keep)
    wrapped = Float16Module(tconfig, chunk)
    _restore(saved)
    return wrapped


def param_group_overrides(ocfg) -> dict:
    """megatron optimizer ``config_overrides`` for a bf16 model that keeps some fp32 parameters.

    megatron's standard overrides (no weight decay on biases and 1-D parameters) plus one that puts
    every fp32 parameter (our routers') in param groups of their own, with the same hyperparameters.
    Why: megatron-core 0.16.1's DistributedOptimizer indexes a group's parameters in grad-buffer
    order (bf16 buffer first) but installs them fp32-first, so in a group that mixes dtypes its
    checkpoint code reads and writes the optimizer state of the wrong parameter (a size-mismatch
    error at save, or silently swapped state; NVIDIA/Megatron-LM issue 2777). Groups of one dtype
    have no such mismatch. Training maths is unchanged: same lr, weight decay and schedule.
    """
    from megatron.core.optimizer import get_standard_config_overrides
    from megatron.core.optimizer.optimizer_config import ParamKey, ParamPredicate

    overrides = dict(get_standard_config_overrides(ocfg))
    fp32 = ParamKey(predicate=ParamPredicate(name="native_fp32", fn=lambda p: p.dtype == torch.float32))
    overrides[fp32] = {"native_fp32": True}
    return overrides


def dtype_counts(module: nn.Module) -> dict[str, int]:
    """Number of parameter elements per dtype (for the log line and tests)."""
    counts: dict[str, int] = {}
    for p in module.parameters():
        key = str(p.dtype).removeprefix("torch.")
        counts[key] = counts.get(key, 0) + p.numel()
    return counts
