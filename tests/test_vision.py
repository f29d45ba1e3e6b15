"""The vision tower: SigLIP ViT (random or from a local save_pretrained folder) -> 8 slots/frame -> projector.

.venv/bin/python -m pytest -q tests/test_vision.py
"""

from __future__ import annotations

import logging

import pytest
import torch

from megatron_timeexpert.model.slot_compression import SlotCompression
from megatron_timeexpert.model.vision import VisionConfig, VisionTower

transformers = pytest.importorskip("transformers")

OUT = 24


def _tower(seed: int = 0, **kw) -> VisionTower:
    torch.manual_seed(seed)
    return VisionTower(VisionConfig(out_hidden=OUT, **kw)).eval()


@pytest.fixture(scope="module")
def tower() -> VisionTower:
    return _tower()


def _frames(n: int, seed: int = 1, size: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


def _tiny_siglip(seed: int = 3):
    torch.manual_seed(seed)
    cfg = transformers.SiglipVisionConfig(
        image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=1, num_attention_heads=2, intermediate_size=96
    )
    return transformers.SiglipVisionModel(cfg).eval()


def test_pretrained_folder_loads_its_weights_and_architecture(tmp_path, caplog):
    ref = _tiny_siglip()
    ref.save_pretrained(tmp_path)
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="megatron_timeexpert.model.vision"):
        tw = VisionTower(VisionConfig(pretrained=str(tmp_path), out_hidden=OUT)).eval()
    # The architecture comes from the folder, not from VisionConfig's (64 px, width 64) defaults.
    assert (tw.image_size, tw.feature_dim) == (32, 48)
    assert all(p.dtype == torch.float32 for p in tw.parameters())
    assert not any(n.startswith("vit.head.") for n, _ in tw.named_parameters()), "unused pooling head kept"
    lines = [r.getMessage() for r in caplog.records if r.name == "megatron_timeexpert.model.vision"]
    assert len(lines) == 1 and f"pretrained SigLIP ViT from {tmp_path}" in lines[0], lines
    px = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(tw.patch_features(px), ref(pixel_values=px).last_hidden_state)
        assert tw(torch.rand(3, 3, 40, 40)).shape == (3, 8, OUT)


def test_full_siglip_checkpoint_gives_its_vision_tower(tmp_path):
    vision = dict(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=1, num_attention_heads=2)
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100)
    torch.manual_seed(4)
    full = transformers.SiglipModel(
        transformers.SiglipConfig(text_config=text, vision_config={**vision, "intermediate_size": 96})
    ).eval()
    full.save_pretrained(tmp_path)
    tw = VisionTower(VisionConfig(pretrained=str(tmp_path), out_hidden=OUT))
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(tw.patch_features(px), full.vision_model(pixel_values=px).last_hidden_state)


def test_bad_pretrained_folder_fails_naming_the_path(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match=f"model.vision.pretrained='{missing}'"):
        VisionTower(VisionConfig(pretrained=str(missing)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"'{empty}': no config.json"):
        VisionTower(VisionConfig(pretrained=str(empty)))


def test_checkpoint_missing_vit_weights_is_an_error(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    ref = _tiny_siglip()
    ref.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    sd = {k: v for k, v in safetensors.load_file(weights).items() if ".mlp." not in k}
    safetensors.save_file(sd, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"'{tmp_path}': the checkpoint lacks 4 ViT weights"):
        VisionTower(VisionConfig(pretrained=str(tmp_path)))


def test_random_init_is_deterministic_from_torch_rng_and_logs_its_sizes(caplog):
    with caplog.at_level(logging.INFO, logger="megatron_timeexpert.model.vision"):
        a = _tower(seed=11)
    assert any(
        "random init SigLIP ViT (image 64, patch 16, width 64, 2 layers" in r.getMessage() for r in caplog.records
    )
    b, c = _tower(seed=11), _tower(seed=12)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["slots.slot_init"], sc["slots.slot_init"])
    assert not torch.equal(sa["vit.embeddings.patch_embedding.weight"], sc["vit.embeddings.patch_embedding.weight"])


def test_shapes_and_both_input_layouts(tower):
    f = _frames(3, size=64)
    u8 = (f * 255).round().to(torch.uint8)  # [N, 3, H, W] -> exact values k/255
    with torch.no_grad():
        out_float = tower(u8.float() / 255)
        out_u8 = tower(u8.permute(0, 2, 3, 1).contiguous())  # [N, H, W, 3] uint8
        out_resized = tower(torch.rand(2, 3, 40, 90))  # resized to 64x64
    assert out_float.shape == (3, 8, OUT) and out_resized.shape == (2, 8, OUT)
    torch.testing.assert_close(out_u8, out_float, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="got \\(3, 64, 64\\)"):
        tower(f[0])
    with pytest.raises(ValueError, match="uint8 frames must be \\[N, H, W, 3\\]"):
        tower(u8)


def test_preprocess_normalises_with_siglip_mean_std(tower):
    x = torch.stack([torch.zeros(3, 64, 64), torch.full((3, 64, 64), 0.5), torch.ones(3, 64, 64)])
    px = tower.preprocess(x)
    assert torch.equal(px[:, 0, 0, 0], torch.tensor([-1.0, 0.0, 1.0]))
    assert tower.preprocess(torch.rand(2, 3, 31, 77)).shape == (2, 3, 64, 64)


def test_prenormalized_frames_pass_through_unchanged():
    tw = _tower(prenormalized=True)
    px = torch.randn(2, 3, 64, 64)
    assert torch.equal(tw.preprocess(px), px)
    with pytest.raises(ValueError, match="prenormalized frames must be 64x64"):
        tw.preprocess(torch.randn(2, 3, 32, 32))


def test_slots_are_a_function_of_the_frame(tower):
    a, b = _frames(2, seed=7)
    with torch.no_grad():
        out = tower(torch.stack([a, b, a]))
    torch.testing.assert_close(out[0], out[2], rtol=0, atol=1e-6)
    assert (out[0] - out[1]).abs().max() > 1e-3
    # The 8 slots of one frame are distinct tokens (learned inits break the symmetry).
    d = torch.cdist(out[0], out[0]) + torch.eye(8) * 1e9
    assert d.min() > 1e-3


def test_output_row_depends_only_on_its_frame(tower):
    f = _frames(4, seed=8)
    g = f.clone()
    g[2] = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        a, b = tower(f), tower(g)
    changed = [(a[i] - b[i]).abs().max().item() for i in range(4)]
    assert changed[2] > 1e-3
    assert changed[0] == changed[1] == changed[3] == 0.0, changed


def test_slot_pooling_is_a_set_function_of_the_patches():
    torch.manual_seed(2)
    sc = SlotCompression(dim=16, num_slots=8, iters=3)
    x = torch.randn(2, 20, 16)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(sc(x[:, perm]), sc(x), rtol=1e-5, atol=1e-5)
        w = sc.attention(sc.slot_init.expand(2, -1, -1), sc.to_k(sc.norm_inputs(x)))
    assert w.shape == (2, 8, 20) and w.dtype == torch.float32
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 8))  # each slot: a weighted mean over patches


def test_gradients_reach_slots_projector_and_vit():
    tw = _tower(seed=5).train()
    tw(_frames(2, seed=10)).square().mean().backward()
    for name, p in tw.named_parameters():
        assert p.grad is not None, f"{name}: no gradient"
        assert torch.isfinite(p.grad).all(), name
    for name in (
        "slots.slot_init",
        "slots.to_q.weight",
        "slots.gru.weight_hh",
        "projector.0.weight",
        "projector.2.bias",
    ):
        assert tw.get_parameter(name).grad.abs().sum() > 0, name
    assert tw.get_parameter("vit.embeddings.patch_embedding.weight").grad.abs().sum() > 0


def test_bf16_autocast_on_cpu(tower):
    f = _frames(2, seed=12)
    with torch.no_grad():
        ref = tower(f)
    tw = _tower(seed=0).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tw(f)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 8, OUT)
    assert torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1)
    out.float().sum().backward()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in tw.parameters())
    assert tw.slots.slot_init.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"num_slots": 0}, "num_slots=0"),
        ({"image_size": 60}, "image_size=60: must be a multiple of patch_size=16"),
        ({"hidden_size": 66}, "hidden_size=66: must be divisible by num_heads=4"),
        ({"pretrained": ""}, "pretrained=''"),
        ({"slot_iters": 1.5}, "slot_iters=1.5"),
    ],
)
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field.replace("(", "\\(")):
        VisionConfig(**kw)
