"""Benchmark: our variable-k MoE layer vs megatron-core's MoELayer (allgather and alltoall dispatchers).

Run (CPU, gloo, a few minutes; writes the ``moe_layer`` section of docs/BENCHMARKS.md)::

    python -m bench.moe_layer
    python -m bench.moe_layer --tokens 256 --iters 5 --ep 2   # quicker

At EP = 2 and EP = 4 (one process per EP rank, EP = world size, expert-TP 1), each implementation gets
the same hidden size, expert count, expert width (gelu MLP) and routing rule: both use a softmax top-k
router with the same k, so the mean experts per token is equal. Per rank and iteration we measure
forward + backward wall time (the slowest rank, median over iterations; implementations are
interleaved iteration by iteration so machine noise hits them alike) and the bytes each rank sends
to OTHER ranks, read from the torch profiler's record of every collective the layer calls (forward
and backward; all_to_all: rows sent to peers; all_gather: the local chunk to each peer; all_reduce
and reduce_scatter: the ring volume ``2(G-1)/G`` resp. ``(G-1)/G`` of the buffer). For our layer
the hidden payload of dispatch is also compared with the deduplicated lower bound
``sum_t |remote ranks hosting t's experts| * H * 4``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

IMPLS = ("ours", "ours_records", "mcore_allgather", "mcore_alltoall")


@dataclass
class BenchArgs:
    """Problem size of one benchmark run."""

    tokens: int = 512
    """Tokens per rank (sequence length x micro-batch 2)."""
    hidden: int = 128
    """H."""
    ffn: int = 256
    """Each expert's inner width."""
    experts: int = 8
    """E, number of experts (divisible by every EP size)."""
    topk: int = 2
    """Experts per token for both routers."""
    iters: int = 8
    """Timed iterations per implementation (after 2 warm-up iterations)."""


def _comm_bytes_sent(prof, group_size: int, rank: int) -> float:
    """Bytes this rank sent to other ranks, from the profiler's record of collectives (fp32)."""
    total = 0.0
    for e in prof.events():
        shapes = e.input_shapes or []
        if e.name == "c10d::alltoall_base_":
            rows = shapes[1][0]
            row_bytes = 4 * (int(torch.tensor(shapes[1][1:]).prod().item()) if len(shapes[1]) > 1 else 1)
            in_splits = e.concrete_inputs[4]
            own = in_splits[rank] if in_splits else rows // group_size
            total += (rows - own) * row_bytes
        elif e.name.startswith("gloo:") and shapes and shapes[0]:
            nbytes = 4 * int(torch.tensor(shapes[0]).prod().item())
            g = group_size
            if e.name == "gloo:all_gather":
                total += nbytes * (g - 1)
            elif e.name == "gloo:all_reduce":
                total += nbytes * 2 * (g - 1) / g
            elif e.name == "gloo:reduce_scatter":
                total += nbytes * (g - 1) / g
    return total


def _build(impl: str, a: BenchArgs, ep: int):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.spec_utils import build_module

    common = dict(
        num_layers=1, hidden_size=a.hidden, num_attention_heads=2, ffn_hidden_size=a.ffn, use_cpu_initialization=True
    )
    if impl.startswith("ours"):
        from megatron_timeexpert.moe.router import RouterConfig
        from megatron_timeexpert.moe.spec import get_timeexpert_moe_spec

        # The top-k router does not route with its records; like megatron's router it need not keep
        # them ("ours"). "ours_records" keeps them: accumulated in forward, one all_reduce per step in
        # finish_step(), as the TimeExpert router needs.
        records = impl == "ours_records"
        router = RouterConfig(router_type="topk", num_experts=a.experts, topk=a.topk, record_routing=records)
        return build_module(get_timeexpert_moe_spec(router, reduce_metrics=False), config=TransformerConfig(**common))
    cfg = TransformerConfig(
        **common,
        num_moe_experts=a.experts,
        moe_router_topk=a.topk,
        moe_ffn_hidden_size=a.ffn,
        moe_token_dispatcher_type=impl.removeprefix("mcore_"),
        expert_model_parallel_size=ep,
        moe_aux_loss_coeff=1e-2,
        moe_z_loss_coeff=1e-3,
    )
    return build_module(get_gpt_layer_local_spec(num_experts=a.experts).submodules.mlp, config=cfg)


def _step(layer, x: torch.Tensor) -> None:
    out, _ = layer(x)
    out.sum().backward()
    if hasattr(layer, "finish_step"):  # our layer: reduce the step's routing records (one all_reduce)
        layer.finish_step()


def _bench_child(a: BenchArgs) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from parallel.cpu_compat import apply_cpu_shims

    apply_cpu_shims()
    ep, rank = dist.get_world_size(), dist.get_rank()
    ps.initialize_model_parallel(expert_model_parallel_size=ep, expert_tensor_parallel_size=1)
    try:
        model_parallel_cuda_manual_seed(1)
        layers = {impl: _build(impl, a, ep) for impl in IMPLS}
        torch.manual_seed(rank)
        x = torch.randn(a.tokens // 2, 2, a.hidden, requires_grad=True)
        for _ in range(2):
            for impl in IMPLS:
                _step(layers[impl], x)
        times = {impl: [] for impl in IMPLS}
        for _ in range(a.iters):
            for impl in IMPLS:
                dist.barrier()
                t0 = time.perf_counter()
                _step(layers[impl], x)
                dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                dist.all_reduce(dt, op=dist.ReduceOp.MAX)  # the step takes as long as its slowest rank
                times[impl].append(dt.item())
        sent = {}
        for impl in IMPLS:
            dist.barrier()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
                _step(layers[impl], x)
            sent[impl] = _comm_bytes_sent(prof, ep, rank)
        ours = layers["ours"]
        with torch.no_grad():
            routed = ours.route(x.detach())
        ours.pop_metrics()  # drop what route() recorded: the metrics below are of one full step
        host = ours.placement.expert_rank()
        lower_bound = sum(
            len({host[e].item() for e in row.nonzero().flatten()} - {ours.ep_rank}) for row in routed.router.routing_map
        )
        _step(ours, x)
        m = ours.pop_metrics()
        return {
            "time_ms": {impl: 1e3 * statistics.median(v) for impl, v in times.items()},
            "sent": sent,
            "ours_dispatch_bytes": m["bytes/dispatch_sent"],
            "lower_bound_bytes": lower_bound * a.hidden * 4,
            "ours_k": m["experts_per_token/ALL"],
        }
    finally:
        ps.destroy_model_parallel()


def run(a: BenchArgs, eps: tuple[int, ...]) -> dict[int, list[dict]]:
    from parallel.testing import run_distributed

    return {ep: run_distributed(_bench_child, ep, args=(a,), timeout=600) for ep in eps}


def report(a: BenchArgs, results: dict[int, list[dict]], command: str) -> str:
    from bench.report import machine_line

    lines = [
        "## MoE layer: ours vs megatron-core MoELayer",
        "",
        machine_line(),
        "",
        f"Command: `{command}`",
        "",
        f"Per rank: {a.tokens} tokens, H={a.hidden}, expert FFN={a.ffn} (gelu), E={a.experts}, top-{a.topk} softmax "
        "routers on both sides (equal mean experts per token). `ours`: `record_routing=False` (the top-k router does "
        "not route with its records); `ours_records`: plus the routing records, accumulated in forward and "
        "reduced by one all_reduce per step in `finish_step` (what the TimeExpert router needs; counted here). "
        "fp32, gloo, one process per EP rank. Time: forward + "
        f"backward of one layer, slowest rank, median of {a.iters}. Bytes: sent to other ranks per rank and step "
        "(forward + backward, every collective the layer calls, from the torch profiler).",
        "",
        "| EP | impl | fwd+bwd ms | time vs ours | bytes sent/rank | bytes vs ours |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for ep, ranks in results.items():
        t = {impl: ranks[0]["time_ms"][impl] for impl in IMPLS}
        b = {impl: statistics.mean(r["sent"][impl] for r in ranks) for impl in IMPLS}
        for impl in IMPLS:
            lines.append(
                f"| {ep} | {impl} | {t[impl]:.2f} | {t[impl] / t['ours']:.2f}x | {b[impl]:,.0f} | "
                f"{b[impl] / b['ours']:.2f}x |"
            )
    lines += ["", "Our dispatch hidden payload vs the deduplicated lower bound (forward, mean per rank):", ""]
    for ep, ranks in results.items():
        ours = statistics.mean(r["ours_dispatch_bytes"] for r in ranks)
        lb = statistics.mean(r["lower_bound_bytes"] for r in ranks)
        k = statistics.mean(r["ours_k"] for r in ranks)
        lines.append(f"- EP={ep}: {ours:,.0f} B sent, lower bound {lb:,.0f} B (mean experts per token {k:.2f})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    defaults = BenchArgs()
    for name, value in asdict(defaults).items():
        p.add_argument(f"--{name}", type=int, default=value)
    p.add_argument("--ep", type=int, nargs="+", default=[2, 4])
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    ns = p.parse_args(argv)
    a = BenchArgs(**{k: getattr(ns, k) for k in asdict(defaults)})
    results = run(a, tuple(ns.ep))
    command = "python -m bench.moe_layer " + " ".join(sys.argv[1:] if argv is None else argv)
    text = report(a, results, command.strip())
    print(text)
    if not ns.no_write:
        from bench.report import write_section

        print("wrote", write_section("moe_layer", text))


if __name__ == "__main__":
    main()
