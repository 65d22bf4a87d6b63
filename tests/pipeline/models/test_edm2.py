"""EDM2 architecture: magnitude preservation, preconditioning, forced weight norm, sizes."""

import json
import math

import pytest
import torch

from pipeline.models.edm2 import (
    PRESETS,
    MPConv,
    MPFourier,
    build_denoiser,
    cosine_attention,
    mp_cat,
    mp_silu,
    mp_sum,
    normalize,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def rms(x: torch.Tensor) -> float:
    return x.square().mean().sqrt().item()


def tiny(num_classes: int = 2, **overrides: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_denoiser("ci", 16, 3, num_classes, **{"channels": 8, **overrides})


def test_normalize_gives_unit_rms_over_dim() -> None:
    x = 3.0 * torch.randn(4, 16, 8, 8) + 1.0
    per_sample = normalize(x).square().mean(dim=(1, 2, 3)).sqrt()
    per_pixel = normalize(x, dim=1).square().mean(dim=1).sqrt()
    torch.testing.assert_close(per_sample, torch.ones(4), atol=1e-3, rtol=0)
    torch.testing.assert_close(per_pixel, torch.ones(4, 8, 8), atol=1e-3, rtol=0)


def test_mp_silu_keeps_unit_rms() -> None:
    assert rms(mp_silu(torch.randn(1_000_000))) == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 0.9])
def test_mp_sum_keeps_unit_rms(t: float) -> None:
    a, b = torch.randn(2, 200_000)
    assert rms(mp_sum(a, b, t)) == pytest.approx(1.0, abs=0.02)


def test_mp_cat_keeps_unit_rms_and_balance() -> None:
    a, b, t = torch.randn(64, 24, 8, 8), torch.randn(64, 40, 8, 8), 0.3
    y = mp_cat(a, b, t=t)
    share_a = y[:, :24].square().sum() / y.square().sum()  # expected (1-t)^2 / ((1-t)^2 + t^2)
    assert y.shape == (64, 64, 8, 8)
    assert rms(y) == pytest.approx(1.0, abs=0.02)
    assert share_a.item() == pytest.approx((1 - t) ** 2 / ((1 - t) ** 2 + t**2), abs=0.01)


def test_mp_fourier_keeps_unit_rms_in_fp32() -> None:
    torch.manual_seed(0)
    fourier = MPFourier(256)
    y = fourier(torch.randn(4096))
    assert y.shape == (4096, 256) and y.dtype == torch.float32
    assert rms(y) == pytest.approx(1.0, abs=0.03)


def test_mp_conv_keeps_unit_rms_and_scales_with_gain() -> None:
    torch.manual_seed(0)
    linear, conv = MPConv(256, 64, ()).eval(), MPConv(32, 48, (3, 3)).eval()
    x_lin, x_conv = torch.randn(2048, 256), torch.randn(16, 32, 16, 16)
    assert rms(linear(x_lin)) == pytest.approx(1.0, abs=0.03)
    interior = conv(x_conv)[..., 1:-1, 1:-1]  # away from the zero padding
    assert rms(interior) == pytest.approx(1.0, abs=0.03)
    torch.testing.assert_close(conv(x_conv, gain=2.5), 2.5 * conv(x_conv))


def explicit_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """softmax(q^T k / sqrt(c)) v written out, with EDM2's channel layout: channel (head * c_head + i) * 3 + j
    is component i of head `head` of q (j = 0), k (1) or v (2)."""
    b, c3, h, w = qkv.shape
    c_head = c3 // (3 * num_heads)
    index = lambda j: [(head * c_head + i) * 3 + j for head in range(num_heads) for i in range(c_head)]  # noqa: E731
    q, k, v = (qkv[:, index(j)].reshape(b, num_heads, c_head, h * w) for j in range(3))
    q, k, v = (y / (1e-4 + y.square().mean(dim=2, keepdim=True).sqrt()) for y in (q, k, v))
    logits = torch.einsum("bhcq,bhck->bhqk", q, k) / math.sqrt(q.shape[2])
    y = torch.einsum("bhqk,bhck->bhcq", logits.softmax(dim=-1), v)
    return y.reshape(b, c3 // 3, h, w)


def test_sdpa_attention_matches_explicit_softmax() -> None:
    torch.manual_seed(0)
    qkv = torch.randn(2, 3 * 128, 4, 4)
    expected = explicit_attention(qkv, num_heads=2)
    torch.testing.assert_close(cosine_attention(qkv, num_heads=2), expected, atol=1e-4, rtol=1e-4)
    scaled = qkv.clone()
    scaled[:, 0::3] *= 7.0  # cosine attention: the magnitude of q does not matter
    actual = cosine_attention(scaled, num_heads=2)
    torch.testing.assert_close(actual, expected, atol=1e-3, rtol=1e-3)


def test_attention_layout_is_edm2s_not_q_k_v_blocks() -> None:
    """The same q, k, v laid out the other way ([3, heads, c_head]: all of q, then k, then v) give another
    output: EDM2's released weights would load and compute something else."""
    torch.manual_seed(1)
    qkv = torch.randn(2, 3 * 16, 4, 4)
    blocks = qkv.reshape(2, 16, 3, 4, 4).transpose(1, 2).reshape(2, 48, 4, 4)  # q | k | v
    torch.testing.assert_close(cosine_attention(qkv, num_heads=2), explicit_attention(qkv, num_heads=2))
    assert (cosine_attention(blocks, num_heads=2) - explicit_attention(qkv, num_heads=2)).abs().max() > 0.1


@pytest.mark.parametrize("num_classes", [0, 3])
@pytest.mark.parametrize("sigma", [0.002, 0.5, 80.0, "per-sample"])
def test_denoiser_at_init_is_c_skip_x(num_classes: int, sigma: float | str) -> None:
    net = tiny(num_classes)
    x = torch.randn(3, 3, 16, 16) * 2.0
    s = torch.tensor([0.01, 1.0, 20.0]) if sigma == "per-sample" else torch.full([3], sigma)
    c_skip = (0.25 / (s.double() ** 2 + 0.25)).float().reshape(-1, 1, 1, 1)
    labels = torch.tensor([0, 1, 2]) if num_classes else None
    for call_sigma in (s, s[0]) if sigma != "per-sample" else (s,):
        for call_labels in (labels, None):
            actual = net(x, call_sigma, call_labels)
            torch.testing.assert_close(actual, c_skip * x, rtol=1e-6, atol=1e-7)
    assert net.sigma_data == 0.5


def test_labels_none_is_zero_label_vector_and_unconditional_ignores_labels() -> None:
    net, x = tiny(2).eval(), torch.randn(2, 3, 16, 16)
    sigma, labels, zeros = torch.tensor([0.3, 3.0]), torch.tensor([0, 1]), torch.tensor([0, 0])
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("gain"):
                p.fill_(1.0)
        y_none, y_0, y_1 = net(x, sigma, None), net(x, sigma, zeros), net(x, sigma, labels)
        assert not torch.allclose(y_0, y_1) and not torch.allclose(y_none, y_0)
        net.unet.emb_label.weight.zero_()  # every label now embeds to the zero vector
        torch.testing.assert_close(net(x, sigma, labels), y_none)
    uncond = tiny(0).eval()
    torch.testing.assert_close(uncond(x, sigma, labels), uncond(x, sigma, None))


def test_u_is_per_sample_and_depends_on_sigma() -> None:
    net = tiny()
    u = net.u(torch.tensor([0.01, 1.0, 50.0]))
    assert u.shape == (3,) and u.unique().numel() == 3
    assert net.u(1.0).shape == (1,)


def mp_weights(net: torch.nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in net.modules() if isinstance(m, MPConv)]


def row_rms_error(w: torch.Tensor) -> float:
    return (w.flatten(1).square().mean(dim=1).sqrt() - 1).abs().max().item()


def test_forced_weight_normalisation_after_optimizer_step() -> None:
    from pipeline.diffusion.loss import edm2_loss

    net = tiny(2).train()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("gain"):
                p.fill_(1.0)  # gains start at 0, which would zero every weight gradient
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    y, labels = 0.5 * torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 0, 1])
    batch = (y, labels, torch.tensor([0.1, 0.5, 2.0, 10.0]))
    edm2_loss(net, *batch, noise=torch.randn(4, 3, 16, 16)).loss.backward()
    opt.step()
    # The step left the unit sphere (every row further from it than normalize's eps of 1e-4 leaves) ...
    assert min(row_rms_error(w) for w in mp_weights(net)) > 2e-4
    before = [w.clone() for w in mp_weights(net)]
    with torch.no_grad():
        net.eval()(batch[0], batch[2], batch[1])
        assert all(torch.equal(w, b) for w, b in zip(mp_weights(net), before))  # eval: no rewrite
        edm2_loss(net.train(), *batch, noise=torch.randn(4, 3, 16, 16))
    assert max(row_rms_error(w) for w in mp_weights(net)) < 2e-4  # ... and training's forward put it back


def test_param_counts_match_paper() -> None:
    expected = {"XS": 124.7, "S": 280.2, "M": 497.8, "L": 777.5, "XL": 1119.3, "XXL": 1523.2}
    for preset, millions in expected.items():
        with torch.device("meta"):
            net = build_denoiser(preset, 64, 4, 1000)
        assert round(sum(p.numel() for p in net.parameters()) / 1e6, 1) == millions, preset


def test_attention_resolutions_are_absolute() -> None:
    with torch.device("meta"):
        net = build_denoiser("XS", 64, 4, 1000)
    attention = [name for name, m in net.named_modules() if getattr(m, "num_heads", 0)]
    with_attn = {name.split("_")[0] for name in attention}
    assert with_attn == {"unet.enc.16x16", "unet.enc.8x8", "unet.dec.16x16", "unet.dec.8x8"}


def test_config_rebuilds_same_architecture() -> None:
    net = tiny(5, attn_resolutions=[16, 8], dropout=0.1)
    config = json.loads(json.dumps(net.config))
    assert (config["channels"], config["attn_resolutions"], config["dropout"]) == (8, [16, 8], 0.1)
    rebuilt = build_denoiser(**config)
    shapes = {k: v.shape for k, v in net.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
    rebuilt.load_state_dict(net.state_dict())
    x, sigma, labels = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 2.0]), torch.tensor([1, 4])
    torch.testing.assert_close(rebuilt.eval()(x, sigma, labels), net.eval()(x, sigma, labels))


def test_unknown_preset_or_override_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="'XS'.*'demo'"):
        build_denoiser("tiny", 16, 3, 0)
    with pytest.raises(ValueError, match="width.*channels"):
        build_denoiser("ci", 16, 3, 0, width=8)
    assert {"XS", "S", "M", "L", "XL", "XXL", "ci", "demo"} == set(PRESETS)
