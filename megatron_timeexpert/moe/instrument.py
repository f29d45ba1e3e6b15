"""Per-layer MoE instrumentation: what the profiler and the metrics line read.

One :class:`MoEInstrument` per MoE layer (no module-level state). It records, per forward:

- named profiler ranges ``moe/L{layer}/route``, ``.../dispatch``, ``.../experts``, ``.../combine``
  (``torch.profiler.record_function``, visible in ``torch.profiler`` traces; plus NVTX ranges of the
  same names when CUDA is available, visible in Nsight Systems), and the wall time of each phase
  (CUDA events on GPU, resolved only when read; ``time.perf_counter`` on CPU);
- tokens per logical expert, and the experts-per-token (k) distribution by token type;
- bytes this rank sent/received in dispatch (hidden payload and weights/mask metadata) and combine;
- the router's losses (already scaled) and metrics.

Cheap when nobody reads them: counters stay tensors on the layer's device (no host sync per step);
the only host work per forward is adding a few Python ints. :meth:`MoEInstrument.pop` turns them into
floats, averaged over the forwards since the last pop and, when a group is given, over the ranks of
that group with ONE ``all_reduce(SUM)`` of a flat float64 vector (every rank of the group must call
pop together, and its router must report the same LOSS names on every rank). The router's own
``metrics`` are averaged over this rank's forwards only (their names may differ between ranks, e.g.
per-type entries for types a rank did not see), so they never enter the reduction.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist

from megatron_timeexpert.moe.types import NUM_TOKEN_TYPES, TokenType
from parallel.env import collective_device

PHASES = ("route", "dispatch", "experts", "combine")
BYTE_FIELDS = ("dispatch_sent", "dispatch_received", "meta_sent", "meta_received", "combine_sent", "combine_received")


class MoEInstrument:
    """Accumulates one MoE layer's statistics between pops (see module docstring).

    Args:
        num_experts: E_max (logical ids).
        name: prefix of the profiler ranges, e.g. ``"moe/L3"``.
    """

    def __init__(self, num_experts: int, name: str = "moe"):
        self.num_experts = num_experts
        self.name = name
        self._reset()

    def _reset(self) -> None:
        self.forwards = 0
        self.tokens_per_expert: torch.Tensor | None = None  # [E] float64 sums
        self.k_hist: torch.Tensor | None = None  # [types, E+1] float64 counts
        self.bytes = dict.fromkeys(BYTE_FIELDS, 0.0)
        self.times: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self._pending_events: list[tuple[str, object, object]] = []
        self.losses: dict[str, torch.Tensor] = {}
        self.router_metrics: dict[str, tuple[float, int]] = {}  # name -> (sum, forwards that reported it)

    @contextlib.contextmanager
    def phase(self, phase: str) -> Iterator[None]:
        """Profiler range ``{name}/{phase}`` (+ NVTX on GPU) and the phase's wall time."""
        label = f"{self.name}/{phase}"
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.nvtx.range_push(label)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            t0 = time.perf_counter()
        try:
            with torch.profiler.record_function(label):
                yield
        finally:
            if cuda:
                end.record()
                self._pending_events.append((phase, start, end))
                torch.cuda.nvtx.range_pop()
            else:
                self.times[phase] += (time.perf_counter() - t0) * 1e3

    def record_routing(self, routing_map: torch.Tensor, token_type: torch.Tensor) -> None:
        """Count tokens per expert and the k histogram per token type (stays on device)."""
        rm = routing_map.detach()
        per_expert = rm.sum(dim=0, dtype=torch.float64)
        k = rm.sum(dim=1)
        flat = token_type.long() * (self.num_experts + 1) + k
        hist = torch.bincount(flat, minlength=NUM_TOKEN_TYPES * (self.num_experts + 1)).to(torch.float64)
        hist = hist.view(NUM_TOKEN_TYPES, self.num_experts + 1)
        if self.tokens_per_expert is None:
            self.tokens_per_expert, self.k_hist = per_expert, hist
        else:
            self.tokens_per_expert = self.tokens_per_expert + per_expert
            self.k_hist = self.k_hist + hist

    def record_bytes(self, **nbytes: int) -> None:
        """Add this forward's byte counts (keys from :data:`BYTE_FIELDS`)."""
        for key, value in nbytes.items():
            self.bytes[key] += float(value)

    def record_router(self, losses: dict[str, torch.Tensor], metrics: dict[str, float]) -> None:
        """Add the router's (scaled) losses and metrics of this forward; counts one forward."""
        self.forwards += 1
        for key, value in losses.items():
            v = value.detach().to(torch.float64)
            self.losses[key] = self.losses[key] + v if key in self.losses else v
        for key, value in metrics.items():
            total, n = self.router_metrics.get(key, (0.0, 0))
            self.router_metrics[key] = (total + float(value), n + 1)

    def pop(self, group: dist.ProcessGroup | None = None, force_reduce: bool = False) -> dict[str, float]:
        """Averages since the last pop (over forwards, and over ``group``'s ranks when given); resets.

        The reduction runs on the device the group's backend needs (CUDA for NCCL, CPU for gloo);
        it is skipped for a group of one rank unless ``force_reduce`` (tests of the NCCL path).

        Keys: ``loss/<name>``, ``router/<name>`` (local), ``experts_per_token/<TYPE>`` and ``/ALL`` (mean k),
        ``k_frac/<TYPE>/<k>`` (fraction of that type's tokens firing k experts; only nonzero
        entries), ``tokens_per_expert/<e>`` (per forward, summed over the group's ranks),
        ``bytes/<field>`` and ``time_ms/<phase>`` (per forward and rank), ``forwards``.
        """
        for phase, start, end in self._pending_events:
            end.synchronize()
            self.times[phase] += start.elapsed_time(end)
        self._pending_events = []
        e1 = self.num_experts + 1
        loss_keys, metric_keys = sorted(self.losses), sorted(self.router_metrics)
        tpe = self.tokens_per_expert if self.tokens_per_expert is not None else torch.zeros(self.num_experts)
        hist = self.k_hist if self.k_hist is not None else torch.zeros(NUM_TOKEN_TYPES, e1)
        scalars = [self.forwards, *(self.bytes[k] for k in BYTE_FIELDS), *(self.times[p] for p in PHASES)]
        parts = [
            torch.tensor(scalars, dtype=torch.float64),
            torch.stack([self.losses[k].cpu().reshape(()) for k in loss_keys]) if loss_keys else torch.zeros(0),
            tpe.cpu().to(torch.float64),
            hist.cpu().reshape(-1).to(torch.float64),
        ]
        flat = torch.cat([p.to(torch.float64) for p in parts])
        ranks = 1
        if group is not None and (dist.get_world_size(group) > 1 or force_reduce):
            device = collective_device(group)
            reduced = flat.to(device)
            dist.all_reduce(reduced, group=group)
            flat = reduced.cpu()
            ranks = dist.get_world_size(group)
        n_scalar, n_loss = len(scalars), len(loss_keys)
        scal, loss_v, tpe_v, hist_v = flat.split([n_scalar, n_loss, self.num_experts, NUM_TOKEN_TYPES * e1])
        fw = max(scal[0].item(), 1.0)  # forwards summed over ranks
        per_rank_fw = fw / ranks
        out: dict[str, float] = {"forwards": scal[0].item() / ranks}
        for i, k in enumerate(BYTE_FIELDS):
            out[f"bytes/{k}"] = scal[1 + i].item() / fw
        for i, p in enumerate(PHASES):
            out[f"time_ms/{p}"] = scal[1 + len(BYTE_FIELDS) + i].item() / fw
        for k in metric_keys:
            total, n = self.router_metrics[k]
            out[f"router/{k}"] = total / n
        for i, k in enumerate(loss_keys):
            out[f"loss/{k}"] = loss_v[i].item() / fw
        for e in range(self.num_experts):
            out[f"tokens_per_expert/{e}"] = tpe_v[e].item() / per_rank_fw
        hist_v = hist_v.view(NUM_TOKEN_TYPES, e1)
        ks = torch.arange(e1, dtype=torch.float64)
        total_tokens, total_k = hist_v.sum().item(), (hist_v * ks).sum().item()
        out["experts_per_token/ALL"] = total_k / total_tokens if total_tokens else 0.0
        for t in TokenType:
            n = hist_v[t].sum().item()
            out[f"experts_per_token/{t.name}"] = (hist_v[t] * ks).sum().item() / n if n else 0.0
            for k in range(e1):
                if hist_v[t, k] > 0:
                    out[f"k_frac/{t.name}/{k}"] = hist_v[t, k].item() / n
        self._reset()
        return out
