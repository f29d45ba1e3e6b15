"""The parallel layout of a run (TP, PP, EP, expert-TP, DP, virtual PP) and its process groups.

One :class:`ParallelLayout` describes how ``world_size`` ranks split the model. ``validate()``
checks every constraint BEFORE any process group exists and says what to change;
``initialize()`` then builds megatron-core's groups (``parallel_state.initialize_model_parallel``)
and seeds megatron's named RNG streams. Communication: group creation is a collective over the
whole world (every rank must call ``initialize`` with the same layout).

megatron-core's rank order is tp-cp-ep-dp-pp for dense and expert groups alike; with expert-TP 1
the expert-parallel ranks are drawn from the TP x DP ranks of one pipeline stage.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


class LayoutError(ValueError):
    """A parallel layout that cannot work; the message names the field and what to change."""


@dataclass
class ParallelLayout:
    """How the ranks of one run split the model. DP is derived: world / (TP x PP)."""

    tp: int = 1
    """Tensor-parallel size (attention/MLP weights split across ranks; sequence parallel is on when > 1)."""
    pp: int = 1
    """Pipeline-parallel size (consecutive layers on consecutive stages)."""
    ep: int = 1
    """Expert-parallel size (experts spread over ranks; tokens reach them by all-to-all)."""
    etp: int = 1
    """Expert tensor-parallel size (each expert split over this many ranks)."""
    vpp: int | None = None
    """Virtual pipeline stages per rank (interleaved schedule); None for the plain 1F1B schedule."""
    collective_timeout_s: float = 600.0
    """Bound on every collective wait, in seconds (all process groups: default, TP, PP, DP, EP). A rank
    that dies mid-step makes the others exit within this bound plus a 15 s exit grace
    (docs/LAUNCH.md); raise it for very long first steps or slow checkpoint saves."""

    def dp(self, world_size: int) -> int:
        """Data-parallel size for ``world_size`` ranks."""
        return world_size // (self.tp * self.pp)

    def validate(
        self,
        world_size: int,
        num_layers: int | None = None,
        num_experts: int | None = None,
        num_attention_heads: int | None = None,
        global_batch_size: int | None = None,
        micro_batch_size: int | None = None,
    ) -> None:
        """Raise :class:`LayoutError` naming the first violated constraint and a fix."""
        for name in ("tp", "pp", "ep", "etp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise LayoutError(f"parallel.{name}={value!r}: must be a positive integer")
        if not self.collective_timeout_s > 0:
            raise LayoutError(f"parallel.collective_timeout_s={self.collective_timeout_s!r}: must be > 0 seconds")
        if self.vpp is not None and (not isinstance(self.vpp, int) or self.vpp < 1):
            raise LayoutError(f"parallel.vpp={self.vpp!r}: must be a positive integer or null")
        if world_size % (self.tp * self.pp):
            raise LayoutError(
                f"world size {world_size} is not divisible by tp*pp = {self.tp}*{self.pp} = {self.tp * self.pp}: "
                f"launch a multiple of {self.tp * self.pp} processes or change parallel.tp / parallel.pp"
            )
        expert_block = self.etp * self.ep * self.pp
        if world_size % expert_block:
            raise LayoutError(
                f"world size {world_size} is not divisible by etp*ep*pp = {self.etp}*{self.ep}*{self.pp}: "
                f"expert groups are cut from the TPxDP ranks of a stage; lower parallel.ep or parallel.etp"
            )
        if self.vpp is not None and self.vpp > 1 and self.pp == 1:
            raise LayoutError(f"parallel.vpp={self.vpp} needs parallel.pp > 1 (interleaving needs stages)")
        if num_layers is not None:
            chunks = self.pp * (self.vpp or 1)
            if num_layers % chunks:
                raise LayoutError(
                    f"model.num_layers={num_layers} is not divisible by pp*vpp = {chunks}: "
                    f"choose num_layers as a multiple of {chunks}"
                )
        if num_experts is not None and num_experts % self.ep:
            raise LayoutError(
                f"moe.num_experts={num_experts} is not divisible by parallel.ep={self.ep}: every expert-parallel "
                f"rank holds the same number of expert slots; use a multiple of {self.ep}"
            )
        if num_attention_heads is not None and num_attention_heads % self.tp:
            raise LayoutError(
                f"model.num_attention_heads={num_attention_heads} is not divisible by parallel.tp={self.tp}"
            )
        if global_batch_size is not None and micro_batch_size is not None:
            dp = self.dp(world_size)
            if global_batch_size % (micro_batch_size * dp):
                raise LayoutError(
                    f"training.global_batch_size={global_batch_size} is not divisible by "
                    f"micro_batch_size*dp = {micro_batch_size}*{dp}: pick a multiple of {micro_batch_size * dp}"
                )
            microbatches = global_batch_size // (micro_batch_size * dp)
            if self.vpp is not None and self.vpp > 1 and microbatches % self.pp:
                raise LayoutError(
                    f"the interleaved schedule needs the number of microbatches ({microbatches}) to be a "
                    f"multiple of parallel.pp={self.pp}; raise training.global_batch_size"
                )

    def describe(self, world_size: int) -> str:
        """One line for logs: ``world=4 tp=2 pp=2 ep=2 etp=1 dp=1 vpp=-``."""
        vpp = self.vpp if self.vpp else "-"
        return (
            f"world={world_size} tp={self.tp} pp={self.pp} ep={self.ep} etp={self.etp} "
            f"dp={self.dp(world_size)} vpp={vpp}"
        )

    def initialize(self, seed: int) -> None:
        """Build megatron-core's process groups for this layout and seed its RNG streams.

        Collective over the default process group (``torch.distributed`` must be initialized).
        """
        import torch.distributed as dist
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        world = dist.get_world_size()
        self.validate(world)
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=self.tp,
            pipeline_model_parallel_size=self.pp,
            virtual_pipeline_model_parallel_size=self.vpp if self.vpp and self.vpp > 1 else None,
            expert_model_parallel_size=self.ep,
            expert_tensor_parallel_size=self.etp,
            distributed_timeout_minutes=self.collective_timeout_s / 60.0,
        )
        model_parallel_cuda_manual_seed(seed)
        if dist.get_rank() == 0:
            log.info("parallel layout: %s (backend %s)", self.describe(world), dist.get_backend())
