"""The TimeExpert model (model/timeexpert.py, model/heads.py) on a tiny config and a batch that
follows the token contract (/work/notes/tokens.md): it learns, it reports one loss per head, each
position is scored by the head of its target's type, and TP = 2 (sequence parallel) and PP = 2 give
the per-token losses, gradients and megatron grad norm of TP = 1 from the same weights.

    .venv/bin/python -m pytest -q tests/test_timeexpert_model.py
"""

from __future__ import annotations

import pytest
import torch

from megatron_timeexpert.config import Config, ModelConfig, MoEConfig
from megatron_timeexpert.moe.types import TokenType
from parallel.layout import ParallelLayout
from parallel.testing import run_distributed

SEQ = 80
HIDDEN = 32
N_SLOTS = 8
PAD, BOS, EOS, TEXT_SYNC = 0, 1, 2, 3  # TEXT ids of this test's tokenizer stand-in
NUM_SYNC, NUM_SEP = 0, 1  # number vocabulary (tokens.md)


def tiny_config(tp: int = 1, pp: int = 1) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(
        num_layers=2, hidden_size=HIDDEN, num_attention_heads=4, ffn_hidden_size=64, vocab_size=64, seq_length=SEQ
    )
    cfg.moe = MoEConfig(router="timeexpert", num_experts=4, aux_loss_coeff=0.01, z_loss_coeff=0.001)
    cfg.parallel = ParallelLayout(tp=tp, pp=pp, ep=1)
    return cfg


def _numbers(text: str) -> list[int]:
    return [12 if c == "." else 2 + int(c) for c in text]


def _sample(frame_times, instruction, events):
    """ids, types and the target mask (aligned with ids, as data/vtg.py) of one sample laid out as tokens.md says."""
    ids, types = [BOS], [TokenType.TEXT]

    def put(new_ids, kind):
        ids.extend(new_ids)
        types.extend([kind] * len(new_ids))

    for t in frame_times:
        put([0] * N_SLOTS, TokenType.VISUAL)
        put([*_numbers(f"{t:06.1f}"), NUM_SEP], TokenType.TIME)
    put(instruction, TokenType.TEXT)
    response = len(ids)
    for times, scores, caption in events:
        put([TEXT_SYNC], TokenType.TEXT)
        for i, t in enumerate(times):
            put(([NUM_SEP] if i else []) + _numbers(f"{t:06.1f}"), TokenType.TIME)
        put([NUM_SYNC], TokenType.TIME)
        for i, s in enumerate(scores):
            put(([NUM_SEP] if i else []) + _numbers(f"{s:3.1f}"), TokenType.SCORE)
        put([NUM_SYNC], TokenType.SCORE)
        put(caption, TokenType.TEXT)
    put([EOS], TokenType.TEXT)
    n = len(ids)
    assert n <= SEQ
    put([PAD] * (SEQ - n), TokenType.TEXT)
    targets = torch.zeros(SEQ)
    targets[response:n] = 1  # aligned with ids, as data/vtg.py makes it: the response and the EOS
    return ids, [int(t) for t in types], targets


def make_batch() -> dict[str, torch.Tensor]:
    """Two samples: 2 frames (8 VISUAL + 6 TIME + <sep> each), an instruction, 2 events."""
    from megatron_timeexpert.model.timeexpert import next_token_targets

    samples = [
        _sample([0.0, 2.5], [10, 11, 12], [([1.5, 4.0], [4.0], [20, 21]), ([12.3], [], [])]),
        _sample([1.0, 3.0], [13, 14], [([0.5, 2.0], [1.0, 2.5], [22]), ([7.0, 9.5], [0.5], [23, 24])]),
    ]
    ids = torch.tensor([s[0] for s in samples])
    types = torch.tensor([s[1] for s in samples])
    t = next_token_targets(ids, types, torch.stack([s[2] for s in samples]), pad_id=PAD)
    g = torch.Generator().manual_seed(7)
    return {
        "ids": ids,
        "types": types,
        "position_ids": torch.arange(SEQ).expand(2, SEQ).contiguous(),
        "visual": torch.randn(2, 2 * N_SLOTS, HIDDEN, generator=g),
        "labels": t.labels,
        "label_types": t.label_types,
        "loss_mask": t.loss_mask,
    }


def _init(cfg: Config, seed: int = 3):
    from parallel.cpu_compat import apply_cpu_shims

    apply_cpu_shims()
    cfg.parallel.initialize(seed)
    torch.manual_seed(seed)


def _forward(model, b: dict, labels: bool = True, label_types=None):
    extra = {}
    if labels:
        extra = dict(
            labels=b["labels"],
            label_types=b["label_types"] if label_types is None else label_types,
            loss_mask=b["loss_mask"],
        )
    return model(b["ids"], b["types"], b["position_ids"], None, visual=b["visual"], **extra)


def _reference_losses(model, b: dict, label_types: torch.Tensor) -> torch.Tensor:
    """Per-token losses from the final hidden states and ``logits_for_generation`` of the head of each
    target's type in ``label_types`` (an independent path through the heads)."""
    from megatron_timeexpert.model.heads import head_of_type

    hidden = _forward(model, b, labels=False)  # [b, s, h]
    head = head_of_type(label_types)
    ref = torch.zeros(b["labels"].shape)
    for i, j in (b["loss_mask"] > 0).nonzero().tolist():
        logits = model.logits_for_generation(hidden[i, j], int(head[i, j]))
        ref[i, j] = torch.nn.functional.cross_entropy(logits[None].float(), b["labels"][i, j][None])
    return ref


# --- one process ------------------------------------------------------------------------------------


def _single_process() -> dict:
    from megatron_timeexpert.model.heads import Head, timeexpert_loss_func
    from megatron_timeexpert.model.timeexpert import build_timeexpert_model

    cfg = tiny_config()
    _init(cfg)
    (model,) = build_timeexpert_model(cfg)
    b = make_batch()
    with torch.no_grad():  # [s, b, h] embeddings minus position embeddings at the VISUAL positions
        emb = model.embedding
        extra = torch.cat([b["visual"], torch.randn(2, 4, HIDDEN)], dim=1)  # spare slot tokens are unused
        x = emb(b["ids"], b["types"], b["position_ids"], extra).transpose(0, 1)
        x = x - emb.position_embeddings(b["position_ids"])
        visual_rows = [x[i][b["types"][i] == TokenType.VISUAL] for i in range(2)]
        try:
            emb(b["ids"], b["types"], b["position_ids"], b["visual"][:, :12])
            too_few = None
        except ValueError as e:
            too_few = str(e)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = []
    for _ in range(20):
        out = _forward(model, b)
        loss_sum, num_tokens, report = timeexpert_loss_func(out)
        opt.zero_grad()
        (loss_sum / num_tokens).backward()
        opt.step()
        history.append({k: (v[0] / v[1]).item() for k, v in report.items()})
    with torch.no_grad():
        out = _forward(model, b)
        _, num_tokens, report = timeexpert_loss_func(out)
        ref = _reference_losses(model, b, b["label_types"])
        # A planted error: the first TIME target of sample 0 scored by the score head instead.
        swapped = b["label_types"].clone()
        pos = (b["loss_mask"][0] > 0) & (swapped[0] == TokenType.TIME)
        j = int(pos.nonzero()[0])
        swapped[0, j] = TokenType.SCORE
        ref_swapped = _reference_losses(model, b, swapped)
    mask = b["loss_mask"] > 0
    counts = {
        h: int((mask & (b["label_types"] == t)).sum()) for h, t in ((Head.TEXT, 1), (Head.TIME, 2), (Head.SCORE, 3))
    }
    return {
        "visual_rows": visual_rows,
        "visual": b["visual"],
        "too_few": too_few,
        "history": history,
        "report": {k: v.tolist() for k, v in report.items()},
        "num_tokens": int(num_tokens),
        "counts": counts,
        "loss": out[..., 0],
        "head": out[..., 1],
        "ref": ref,
        "ref_swapped": ref_swapped,
        "swapped_at": (0, j),
        "time_ref_mean": ref[mask & (b["label_types"] == TokenType.TIME)].mean().item(),
    }


def _single_process_runs() -> dict:
    out = _single_process()
    out["megatron_router"] = _megatron_router_gets_no_types()
    return out


@pytest.fixture(scope="module")
def single():
    return run_distributed(_single_process_runs, 1, timeout=180)[0]


def test_batch_follows_the_token_contract():
    b = make_batch()
    assert (b["types"] == TokenType.VISUAL).sum(1).tolist() == [16, 16]
    # The loss covers the response targets only: the first counted target is the response's TEXT <sync>.
    first = (b["loss_mask"][0] > 0).nonzero()[0].item()
    assert b["labels"][0, first] == TEXT_SYNC and b["label_types"][0, first] == TokenType.TEXT
    assert {int(t) for t in b["label_types"][b["loss_mask"] > 0]} == {1, 2, 3}


def test_visual_slot_tokens_fill_the_visual_positions_in_order(single):
    for i in range(2):
        assert (single["visual_rows"][i] - single["visual"][i]).abs().max().item() < 1e-6
    assert "16 VISUAL positions" in single["too_few"] and "12 slot tokens" in single["too_few"]


def _megatron_router_gets_no_types() -> list:
    from megatron_timeexpert.model.timeexpert import build_timeexpert_model

    cfg = tiny_config()
    cfg.moe.router = "megatron"
    _init(cfg)
    (model,) = build_timeexpert_model(cfg)
    seen = []
    model.decoder.layers[0].mlp.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs.get("padding_mask")), with_kwargs=True
    )
    out = _forward(model, make_batch())
    return [model.routes_by_type, seen, bool(torch.isfinite(out).all())]


def test_megatron_moe_gets_no_token_types_as_padding_mask(single):
    """megatron's own MoE layer reads ``padding_mask`` as padding: it must not receive the types."""
    routes, seen, finite = single["megatron_router"]
    assert routes is False and seen == [None] and finite


def test_model_learns_one_batch(single):
    h = single["history"]
    for key in ("lm loss", "text loss", "time loss", "score loss"):
        assert h[-1][key] < 0.5 * h[0][key], (key, h[0][key], h[-1][key])


def test_per_head_losses_add_up(single):
    rep, counts = single["report"], single["counts"]
    heads = ("text loss", "time loss", "score loss")
    assert [rep[k][1] for k in heads] == [counts[h] for h in sorted(counts)]
    assert all(c > 0 for c in counts.values())
    assert sum(rep[k][1] for k in heads) == rep["lm loss"][1] == single["num_tokens"]
    assert sum(rep[k][0] for k in heads) == pytest.approx(rep["lm loss"][0], rel=1e-6)
    # Positions outside the loss mask carry head -1 and zero loss.
    assert (single["loss"][single["head"] < 0] == 0).all()


def test_each_position_is_scored_by_its_targets_head(single):
    err = (single["loss"] - single["ref"]).abs().max().item()
    assert err < 1e-4, err
    assert single["report"]["time loss"][0] / single["report"]["time loss"][1] == pytest.approx(
        single["time_ref_mean"], rel=1e-5
    )
    # The same comparison catches one position scored by the wrong head.
    i, j = single["swapped_at"]
    planted = (single["loss"] - single["ref_swapped"]).abs()
    assert planted[i, j] > 1e-2 and planted.max().item() == planted[i, j].item()


# --- layouts: TP = 2 (sequence parallel) and PP = 2 vs TP = 1 on gloo ---------------------------------


def _global_name(name: str, offset: int) -> str:
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(int(parts[2]) + offset)
    return ".".join(parts)


def _layer_offset(model) -> int:
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    return get_transformer_layer_offset(model.config, vp_stage=model.vp_stage)


def _tp_split(param) -> bool:
    """Whether ``param`` is split over the TP group (expert slots are tagged TP-parallel, but they are
    split over the expert-parallel group, whole on every TP rank with expert-TP = 1)."""
    return getattr(param, "tensor_model_parallel", False) and getattr(param, "allreduce", True)


def _tp_gather(t: torch.Tensor, param) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1 or not _tp_split(param):
        return t
    parts = [torch.empty_like(t) for _ in range(tp)]
    torch.distributed.all_gather(parts, t.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=param.partition_dim)


def _load_full(model, full: dict[str, torch.Tensor]) -> None:
    """Copy weights by global name, taking this TP rank's slice of TP-split parameters."""
    from megatron.core import parallel_state as ps

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    params = dict(model.named_parameters())
    off = _layer_offset(model)
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if not isinstance(t, torch.Tensor):
                continue
            src = full[_global_name(name, off)]
            p = params.get(name)
            if p is not None and _tp_split(p) and tp > 1:
                src = src.chunk(tp, dim=p.partition_dim)[rank]
            t.copy_(src)


def _run_layout(
    tp: int, pp: int, full: dict | None, plant: str | None = None, vpp: int | None = None, num_layers: int = 2
) -> dict:
    """Build at (tp, pp, vpp), load ``full`` (or keep the fresh init), one forward-backward of 2
    microbatches through megatron's schedule, DDP + finalize_model_grads, megatron's grad norm."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_timeexpert.model.heads import timeexpert_loss_func
    from megatron_timeexpert.model.timeexpert import build_timeexpert_model

    cfg = tiny_config(tp=tp, pp=pp)
    cfg.model.num_layers = num_layers
    cfg.parallel.vpp = vpp
    _init(cfg)
    chunks = build_timeexpert_model(cfg)
    weights, buffers = {}, {}
    for chunk in chunks:
        if full is not None:
            _load_full(chunk, full)
        if plant == "time_embedding_sequence_parallel" and chunk.pre_process:
            chunk.embedding.time_embeddings.weight.sequence_parallel = True
        off = _layer_offset(chunk)
        weights.update({_global_name(n, off): _tp_gather(p.detach(), p) for n, p in chunk.named_parameters()})
        buffers.update({_global_name(n, off): t.detach().clone() for n, t in chunk.named_buffers()})
    tconfig = chunks[0].config
    ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False)
    models = [DistributedDataParallel(tconfig, ddp, chunk, disable_bucketing=i > 0) for i, chunk in enumerate(chunks)]
    tconfig.finalize_model_grads_func = finalize_model_grads
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-12, clip_grad=1e9, params_dtype=torch.float32), models
    )
    b = make_batch()
    microbatches = [{k: v[i : i + 1] for k, v in b.items()} for i in range(2)]
    captured = []
    types_seen = []
    chunks[0].decoder.layers[0].mlp.register_forward_pre_hook(
        lambda mod, args, kwargs: types_seen.append(kwargs["padding_mask"].clone()), with_kwargs=True
    )

    def loss_func(output):
        captured.append(output.detach().clone())
        return timeexpert_loss_func(output)

    def forward_step(data_iterator, m):
        mb = next(data_iterator)
        return _forward(m, mb), loss_func

    for m in models:
        m.zero_grad_buffer()
    reduced = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=[iter(microbatches) for _ in models] if len(models) > 1 else iter(microbatches),
        model=models if len(models) > 1 else models[0],
        num_microbatches=2,
        seq_length=SEQ,
        micro_batch_size=1,
        forward_only=False,
    )
    grads = {}
    for chunk in chunks:
        off = _layer_offset(chunk)
        grads.update(
            {_global_name(n, off): _tp_gather(p.main_grad.detach().clone(), p) for n, p in chunk.named_parameters()}
        )
    generation = None
    if pp == 1:
        with torch.no_grad():
            hidden = _forward(chunks[0], b, labels=False)[:, -10]  # [b, h] at one position
            generation = [chunks[0].logits_for_generation(hidden, head) for head in range(3)]
    sharded = {
        k: (tuple(v.global_shape), tuple(v.global_offset))
        for k, v in chunks[0].sharded_state_dict().items()
        if not k.startswith("decoder.") and k.endswith(".weight")
    }
    _, grad_norm, _ = opt.step()
    return {
        "sharded": sharded,
        "weights": weights,
        "buffers": buffers,
        "grads": grads,
        "grad_norm": float(grad_norm),
        "losses": torch.cat(captured)[..., 0] if captured else None,
        "reports": [{k: v.tolist() for k, v in r.items()} for r in reduced] if captured else None,
        "types_seen": types_seen[:2],
        "generation": generation,
        "tp_rank": _tp_rank(),
    }


def _tp_rank() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank()


def _layouts() -> dict:
    import torch.distributed as dist

    torch.set_num_threads(1)
    # 4 layers, so that PP = 2 with 2 virtual stages per rank (interleaved 1F1B) has a layer per chunk.
    ref = _run_layout(1, 1, None, num_layers=4)
    full = {**ref["weights"], **ref["buffers"]}
    out = {"ref": ref}
    out["tp2"] = _run_layout(2, 1, full, num_layers=4)
    out["tp2_planted"] = _run_layout(2, 1, full, plant="time_embedding_sequence_parallel", num_layers=4)
    out["pp2"] = _run_layout(1, 2, full, num_layers=4)
    out["vpp"] = _run_layout(1, 2, full, vpp=2, num_layers=4)
    for r in out.values():
        r.pop("weights")
        r.pop("buffers")
    out["rank"] = dist.get_rank()
    return out


@pytest.fixture(scope="module")
def layouts():
    return run_distributed(_layouts, 2, timeout=240)


def _merged(layouts, key: str) -> dict:
    """Grads and losses of a layout over both ranks (PP stages hold different parameters)."""
    grads = {}
    losses = None
    for r in layouts:
        grads.update(r[key]["grads"])
        if r[key]["losses"] is not None:
            losses = r[key]["losses"]
    return {"grads": grads, "losses": losses, "grad_norm": layouts[0][key]["grad_norm"]}


def _grad_errors(ref: dict, other: dict) -> dict[str, float]:
    assert set(ref) == set(other), set(ref) ^ set(other)
    return {n: ((ref[n] - other[n]).abs().max() / (ref[n].abs().max() + 1e-12)).item() for n in ref}


@pytest.mark.parametrize("layout", ["tp2", "pp2", "vpp"])
def test_layout_gives_the_reference_losses_and_gradients(layouts, layout):
    ref, other = _merged(layouts, "ref"), _merged(layouts, layout)
    assert other["losses"].shape == ref["losses"].shape == (2, SEQ)
    assert (other["losses"] - ref["losses"]).abs().max().item() < 1e-5
    errs = _grad_errors(ref["grads"], other["grads"])
    bad = {n: e for n, e in errs.items() if e > 1e-4}
    assert not bad, bad
    assert ref["grad_norm"] > 0
    assert other["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
    assert layouts[0][layout]["grad_norm"] == layouts[1][layout]["grad_norm"]


def test_routers_see_the_token_types(layouts):
    """The first MoE layer gets each microbatch's types as ``padding_mask``: the whole sequence at
    TP = 1, this rank's sequence chunk under sequence parallelism (TP = 2)."""
    types = make_batch()["types"]
    for r in layouts:
        for i in range(2):
            assert torch.equal(r["ref"]["types_seen"][i], types[i : i + 1])
            rank, half = r["tp2"]["tp_rank"], SEQ // 2
            assert torch.equal(r["tp2"]["types_seen"][i], types[i : i + 1, rank * half : (rank + 1) * half])


def test_checkpoint_view_shards_only_the_text_vocabulary(layouts):
    """``sharded_state_dict`` (what distributed checkpoints store): the text embedding and head are
    TP-sharded pieces of the [128, 32] padded vocabulary, the number embeddings and heads replicated."""
    assert layouts[0]["ref"]["sharded"] == {
        "embedding.word_embeddings.weight": ((128, 32), (0, 0)),
        "embedding.time_embeddings.weight": ((13, 32), (0, 0)),
        "embedding.score_embeddings.weight": ((13, 32), (0, 0)),
        "embedding.position_embeddings.weight": ((SEQ, 32), (0, 0)),
        "text_head.linear.weight": ((128, 32), (0, 0)),
        "time_head.weight": ((13, 32), (0, 0)),
        "score_head.weight": ((13, 32), (0, 0)),
    }
    for r in layouts:
        tp2, row = r["tp2"]["sharded"], 64 * r["tp2"]["tp_rank"]
        assert tp2["embedding.word_embeddings.weight"] == tp2["text_head.linear.weight"] == ((128, 32), (row, 0))
        assert tp2["time_head.weight"] == tp2["embedding.time_embeddings.weight"] == ((13, 32), (0, 0))


def test_generation_logits_are_gathered_over_tp(layouts):
    ref = layouts[0]["ref"]["generation"]
    assert [tuple(x.shape) for x in ref] == [(2, 64), (2, 13), (2, 13)]  # text: the unpadded vocabulary
    for r in layouts:
        for a, b in zip(ref, r["tp2"]["generation"], strict=True):
            assert (a - b).abs().max().item() < 1e-5


def test_layout_comparison_catches_a_double_counted_replicated_gradient(layouts):
    """Tagging the replicated time embedding ``sequence_parallel`` makes megatron sum its (already
    complete) gradient over TP: the gradient doubles and the comparison sees it."""
    ref, planted = _merged(layouts, "ref"), _merged(layouts, "tp2_planted")
    errs = _grad_errors(ref["grads"], planted["grads"])
    assert errs["embedding.time_embeddings.weight"] == pytest.approx(1.0, rel=1e-4)
    assert planted["grad_norm"] > ref["grad_norm"] * (1 + 1e-4)


# --- the frame head (per-frame relevance, our addition) ---------------------------------------------


def _frame_head_run() -> dict:
    from megatron_timeexpert.model.heads import FRAME_LOSS, timeexpert_loss_func
    from megatron_timeexpert.model.timeexpert import TimeExpertModelConfig, build_timeexpert_model

    cfg = tiny_config()
    _init(cfg)
    mcfg = TimeExpertModelConfig.from_config(cfg)
    mcfg.frame_head = True
    (model,) = build_timeexpert_model(cfg, mcfg)
    b = make_batch()
    # each frame's last position (its <sep>) gets a relevance target; everything else -1
    frame_targets = torch.full(b["ids"].shape, -1.0)
    ends = [[1 + 15 * k + 14 for k in range(2)] for _ in range(2)]
    for i, (p0, p1) in enumerate(ends):
        frame_targets[i, p0], frame_targets[i, p1] = float(i == 0), 1.0
    out = model(
        b["ids"], b["types"], b["position_ids"], None, visual=b["visual"], labels=b["labels"],
        label_types=b["label_types"], loss_mask=b["loss_mask"], frame_targets=frame_targets,
    )  # fmt: skip
    weight = 0.5
    loss_sum, num_tokens, report = timeexpert_loss_func(out, frame_weight=weight)
    loss_sum.backward()
    with torch.no_grad():
        hidden = _forward(model, b, labels=False)  # [b, s, h]
    return {
        "out": out.detach(),
        "loss_sum": float(loss_sum),
        "num_tokens": int(num_tokens),
        "report": {k: v.tolist() for k, v in report.items()},
        "frame_key": FRAME_LOSS,
        "hidden": hidden,
        "w": model.frame_head.weight.detach().clone(),
        "bias": model.frame_head.bias.detach().clone(),
        "bias_grad": model.frame_head.bias.grad.clone(),
        "targets": frame_targets,
        "weight": weight,
    }


@pytest.fixture(scope="module")
def frame_head():
    return run_distributed(_frame_head_run, 1, timeout=180)[0]


def test_frame_loss_is_the_binary_cross_entropy_at_frame_positions(frame_head):
    """Hand computation from the final hidden states: z = h . w + b, loss = -[y log s(z) + (1-y) log(1-s(z))];
    it enters loss_sum times its weight, not num_tokens; its gradient on the bias is w * sum(s(z) - y)."""
    import math

    r = frame_head
    out, targets = r["out"], r["targets"]
    bias_grad, total, count = 0.0, 0.0, 0
    for i, j in (targets >= 0).nonzero().tolist():
        z = float(r["hidden"][i, j].double() @ r["w"][0].double() + r["bias"].double())
        y = float(targets[i, j])
        p = 1 / (1 + math.exp(-z))
        want = -(y * math.log(p) + (1 - y) * math.log(1 - p))
        assert float(out[i, j, 2]) == pytest.approx(want, rel=1e-5, abs=1e-6)
        total += want
        count += 1
        bias_grad += r["weight"] * (p - y)
    assert float(out[..., 3].sum()) == count == 4 and float(out[..., 2][targets < 0].abs().max()) == 0.0
    token_sum = float(out[..., 0].sum())
    assert r["loss_sum"] == pytest.approx(token_sum + r["weight"] * total, rel=1e-6)
    assert r["num_tokens"] == int((out[..., 1] >= 0).sum())  # frames are not loss tokens
    assert r["report"][r["frame_key"]] == pytest.approx([total, 4.0], rel=1e-5)
    assert r["report"]["lm loss"][0] == pytest.approx(r["loss_sum"], rel=1e-6)
    assert float(r["bias_grad"]) == pytest.approx(bias_grad, rel=1e-4, abs=1e-7)
