"""model/frame_tokens.py: per-video standardisation of the slot tokens and the frame-time embedding,
checked against computations written out here (absolute references), plus its error messages."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_timeexpert.model.frame_tokens import PERIODS, FrameTokens, FrameTokensConfig, time_features


def _tokens(b=3, f=5, s=4, h=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    shared = 9.0 * torch.randn(1, 1, s, h, generator=g)  # a large component every frame shares
    return shared + 0.2 * torch.randn(b, f, s, h, generator=g)


def test_standardize_removes_the_shared_part_and_scales_to_the_gain():
    x = _tokens()
    ft = FrameTokens(FrameTokensConfig(standardize=True), hidden=6, init_std=0.02)
    y = ft(x, None).reshape(x.shape)
    # by hand, per sample b and slot s: centre over frames, divide by the RMS over frames and channels
    for b in range(x.shape[0]):
        for s in range(x.shape[2]):
            c = x[b, :, s] - x[b, :, s].mean(0)
            rms = math.sqrt(float(c.pow(2).mean()) + 1e-6 * float(x[b, :, s].pow(2).mean()))
            torch.testing.assert_close(y[b, :, s], 0.02 * c / rms, rtol=1e-5, atol=1e-7)
    # nothing shared by every frame is left: up to fp32 rounding of the mean (|x| * eps * gain / rms, x4)
    c = x - x.mean(1, keepdim=True)
    bound = 4 * float(x.abs().max()) * torch.finfo(torch.float32).eps * 0.02 / float(c.pow(2).mean((1, 3)).sqrt().min())
    assert float(y.mean(dim=1).abs().max()) < bound
    assert float(y.pow(2).mean(dim=(1, 3)).sqrt().sub(0.02).abs().max()) < 1e-4  # text-embedding scale


def test_rows_depend_on_their_own_video_only_and_identical_frames_give_zeros():
    x = _tokens()
    ft = FrameTokens(FrameTokensConfig(standardize=True, time_embedding=True), hidden=6, init_std=0.02)
    times = torch.rand(3, 5) * 20
    full = ft(x, times)
    alone = ft(x[1:2], times[1:2])
    torch.testing.assert_close(full[1:2], alone)  # no statistics across the batch
    still = x[:1, :1].expand(1, 5, 4, 6).clone()  # every frame alike
    out = FrameTokens(FrameTokensConfig(standardize=True), hidden=6, init_std=0.02)(still, None)
    # zeros, not amplified noise: the mean's fp32 rounding (|x| * eps) times gain / sqrt(eps * mean square)
    floor = math.sqrt(1e-6 * float(still.pow(2).mean()))
    assert float(out.abs().max()) < 4 * float(still.abs().max()) * torch.finfo(torch.float32).eps * 0.02 / floor


def test_time_embedding_is_a_linear_map_of_sines_and_cosines_of_the_time():
    ft = FrameTokens(FrameTokensConfig(time_embedding=True), hidden=6, init_std=0.02)
    x = torch.zeros(2, 3, 4, 6)
    times = torch.tensor([[0.0, 1.5, 12.3], [4.0, 99.9, 100.0]])
    y = ft(x, times).reshape(2, 3, 4, 6)
    for b in range(2):
        for f in range(3):
            t = float(times[b, f])
            feats = [math.sin(2 * math.pi * t / p) for p in PERIODS] + [math.cos(2 * math.pi * t / p) for p in PERIODS]
            want = ft.time_proj.weight.double() @ torch.tensor(feats, dtype=torch.float64)
            for s in range(4):  # the same vector on each of the frame's slots
                torch.testing.assert_close(y[b, f, s].double(), want, rtol=1e-5, atol=1e-7)
    assert time_features(times).shape == (2, 3, 2 * len(PERIODS))
    # the init gives entries of about the text embeddings' scale
    many = ft(torch.zeros(1, 400, 1, 6), torch.linspace(0, 300, 400)[None])
    assert 0.01 < float(many.pow(2).mean().sqrt()) < 0.04


def test_gradients_match_finite_differences():
    torch.manual_seed(0)
    ft = FrameTokens(FrameTokensConfig(standardize=True, time_embedding=True), hidden=3, init_std=0.5).double()
    x = torch.randn(2, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    times = torch.tensor([[0.5, 2.0, 7.5], [1.0, 3.0, 9.0]], dtype=torch.float64)
    w = torch.randn(2, 6, 3, dtype=torch.float64)

    def f(x):
        return (ft(x, times).double() * w).sum()

    assert torch.autograd.gradcheck(f, (x,))


def test_errors_name_the_setting():
    ft = FrameTokens(FrameTokensConfig(standardize=True, time_embedding=True), hidden=6, init_std=0.02)
    with pytest.raises(ValueError, match="at least 2 frames.*data.num_frames"):
        ft(_tokens(f=1), torch.zeros(3, 1))
    with pytest.raises(ValueError, match=r"frame times \[b=3, F=5\], got None"):
        ft(_tokens(), None)
    with pytest.raises(ValueError, match=r"tokens must be \[b, F, S, h\]"):
        ft(torch.zeros(3, 5, 6), None)
    with pytest.raises(ValueError, match="eps"):
        FrameTokensConfig(eps=0.0).validate()


def test_config_rules():
    from megatron_timeexpert.config import ConfigError, load_config

    base = ["model.kind=timeexpert", "data.kind=synthetic_vtg", "moe.router=timeexpert"]
    with pytest.raises(ConfigError, match=r"model.frame_tokens.standardize=True: .*data.num_frames >= 2 \(is 1\)"):
        load_config(None, [*base, "model.frame_tokens.standardize=true", "data.num_frames=1"]).validate()
    with pytest.raises(ConfigError, match="data.frame_time_tokens=False: .*time_embedding=true"):
        load_config(None, [*base, "data.frame_time_tokens=false"]).validate()
    with pytest.raises(ConfigError, match=r"model.frame_loss_weight=-1.0"):
        load_config(None, [*base, "model.frame_loss_weight=-1.0"]).validate()
    with pytest.raises(ConfigError, match=r"data.time_digits=7"):
        load_config(None, [*base, "data.time_digits=7"]).validate()
    load_config(None, [*base, "data.frame_time_tokens=false", "model.frame_tokens.time_embedding=true"]).validate()
