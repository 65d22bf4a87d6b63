"""DMD2 in the distill stage: a GAN head on the fake score's encoder features, trained on real images; no pairs.
Which update moves what, and on a Gaussian problem the GAN term corrects a teacher's known bias."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from pipeline import config as C
from pipeline import dag, store
from pipeline.data.encoders import encoder_from_info
from pipeline.diffusion.dmd import OneStepGenerator, student_sigmas
from pipeline.diffusion.gan import DiscriminatorHead, ScoreWithHead, generator_loss
from pipeline.diffusion.loss import sample_sigma
from pipeline.diffusion.sampler import seeded_noise
from pipeline.distill.dmd import dm_loss, fake_means
from pipeline.distill.dmd2 import DMD2
from pipeline.distill.method import DistillArgs, Nets
from pipeline.evaluation import generate, student_model
from pipeline.executor import DDPJob, InlineExecutor, InlineSession
from pipeline.weights import load_denoiser

import helpers

TINY = [*helpers.DISTILL_TINY, *helpers.DMD2]


def _artifact(cfg: C.Config, stage: str) -> store.Artifact:
    return store.Store(cfg.storage).artifact(stage, dag.cache_keys(dag.graph(), cfg)[stage])


def test_dmd2_distills_on_real_images_and_the_pairs_stage_makes_none(tmp_path):
    cfg = C.load_config("ci", [*TINY, "distill.duration_nimg=32"], storage=str(tmp_path))
    dag.run(cfg, until="distill", executor=InlineExecutor())
    pairs = _artifact(cfg, "pairs").manifest()["outputs"]
    assert pairs["num_shards"] == 0 and pairs["teacher"]["sigma_rel"] == 0.1
    rows = [json.loads(line) for line in store.read_bytes(_artifact(cfg, "distill").path("metrics.jsonl")).splitlines()]
    assert [r["nimg"] for r in rows] == [16, 32]
    for r in rows:
        assert "loss_reg" not in r and all(np.isfinite(r[k]) for k in ("loss_dm", "loss_gan_g", "loss_d", "loss_fake"))
        assert 0 <= r["d_acc_real"] <= 1 and 0 <= r["d_acc_fake"] <= 1


@pytest.mark.parametrize("overrides, message", [
    (["distill.method=dmd2"], "distill.method=dmd2 has no regression loss"),
    (["distill.method=dmd2", "distill.lambda_reg=0"], "distill.method=dmd2 uses no regression pairs: set pairs.num_pairs=0"),
    (["pairs.num_pairs=0"], "distill.method=dmd regresses onto pairs"),
    (["distill.method=gan"], "distill.method"),
    (["distill.method=dmd2", "distill.lambda_reg=0", "pairs.num_pairs=0", "distill.gan_balance=0.3"],
     "distill.gan_g_weight = 0.003 asks for a fixed one: set one of them to 0"),
])
def test_inconsistent_dmd2_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        C.load_config("ci", overrides)


def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _moved(before: dict[str, torch.Tensor], module: nn.Module) -> set[str]:
    return {k for k, v in module.named_parameters() if not torch.equal(before[k], v.detach())}


def _fake_function(fake: ScoreWithHead, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The fake score's x0 and the head's logits on a fixed input (eval mode: no in-place renormalisation)."""
    gen = torch.Generator().manual_seed(5)
    fake.eval()
    with torch.no_grad():
        out = fake(torch.randn(8, 3, 16, 16, generator=gen), torch.full((8,), 1.3), labels, return_logits=True)
    fake.train()
    return out


@pytest.fixture(scope="module")
def pairs_cfg(tmp_path_factory) -> C.Config:
    cfg = C.load_config("ci", TINY, storage=str(tmp_path_factory.mktemp("dmd2")))
    dag.run(cfg, until="pairs", executor=InlineExecutor())
    return cfg


def _args(cfg: C.Config, **distill: object) -> DistillArgs:
    phema, encode = _artifact(cfg, "phema"), _artifact(cfg, "encode").manifest()["outputs"]
    teacher = _artifact(cfg, "teacher").manifest()["config"]
    loss = {k: teacher[k] for k in ("P_mean", "P_std", "weighting", "min_snr_gamma", "use_uncertainty")}
    return DistillArgs(replace(cfg.distill, **distill), loss, phema, "phema-0.1000.safetensors", "", [], [],
                       encode["encoder"], None, _artifact(cfg, "distill"), 0)


def _session() -> InlineSession:
    """One CPU worker, as the inline executor runs a training job."""
    return InlineSession(DDPJob("distill", "memory://dmd2/checkpoints"))


def _method(args: DistillArgs) -> DMD2:
    return DMD2.build(args, _session(), encoder_from_info(args.encoder))


def test_a_bottleneck_head_reads_the_last_feature_map_only_and_an_encoder_head_every_one():
    torch.manual_seed(0)
    features = [torch.randn(4, 8, 16, 16), torch.randn(4, 16, 8, 8), torch.randn(4, 16, 4, 4)]
    first_changed = [features[0] + torch.randn_like(features[0]), *features[1:]]
    last_changed = [*features[:-1], features[-1] + torch.randn_like(features[-1])]
    bottleneck, encoder = DiscriminatorHead([16]), DiscriminatorHead([8, 16, 16])
    assert torch.equal(bottleneck(first_changed), bottleneck(features))
    assert not torch.allclose(bottleneck(last_changed), bottleneck(features))
    assert not torch.allclose(encoder(first_changed), encoder(features))


@pytest.mark.parametrize("gan_head", ["bottleneck", "encoder"])
def test_the_heads_update_leaves_g_alone_and_gs_update_leaves_the_head_and_fake_score_alone(pairs_cfg, gan_head):
    method = _method(_args(pairs_cfg, gan_head=gan_head))
    nets = method.nets
    assert isinstance(nets.fake, ScoreWithHead)
    assert len(nets.fake.head.branches) == (1 if gan_head == "bottleneck" else len(nets.real.unet.enc))
    z, labels = method.latents(8)
    real = (torch.randn(8, 3, 16, 16) * 0.5, labels)
    x = nets.generator(z, labels)  # (a training-mode forward renormalises G's weights in place: first)
    g, head, score = _params(nets.generator), _params(nets.fake.head), _params(nets.fake.score)
    info = method.fake_update(real, x, labels)
    assert _moved(g, nets.generator) == set()
    assert _moved(head, nets.fake.head) == set(head) and _moved(score, nets.fake.score)  # the head learns, with the score
    assert {"loss_d", "d_acc_real", "d_acc_fake"} <= set(info)
    for p in nets.fake.parameters():
        p.grad = None
    x = nets.generator(z, labels).float()
    g, head = _params(nets.generator), _params(nets.fake.head)
    fake_before = _fake_function(nets.fake, labels)
    row = method.generator_update(x, labels, {"finite": 1.0})
    assert _moved(head, nets.fake.head) == set()
    # the fake score's training-mode forwards re-normalise its weights in place (EDM2's forced weight
    # normalisation): its function, which uses normalised weights anyway, is what must not change
    for before, after in zip(fake_before, _fake_function(nets.fake, labels)):
        torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert all(p.grad is None for p in nets.fake.parameters())  # G's backward computed nothing for them
    assert _moved(g, nets.generator) and row["loss_gan_g"] > 0


# --- a Gaussian problem: real data N(1, s^2), a teacher that learned N(0, s^2) ---------------------

S = 0.5  # the data's standard deviation, per pixel


class GaussianScore(nn.Module):
    """The exact denoiser of N(mean, S^2) per pixel; its one encoder feature map is the denoised image."""

    sigma_data, num_classes, img_channels, img_resolution = 0.5, 0, 2, 4

    def __init__(self, mean: float, trainable: bool) -> None:
        super().__init__()
        self.mean = nn.Parameter(torch.full((self.img_channels, 1, 1), mean), requires_grad=trainable)

    def u(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(torch.as_tensor(sigma, dtype=torch.float32)).reshape(-1)

    def forward(self, x, sigma, labels=None, return_u=False, return_features=False):
        s2 = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1, 1, 1) ** 2
        x0 = (S**2 * x + s2 * self.mean) / (S**2 + s2)
        extra = ((self.u(sigma),) if return_u else ()) + (([x0],) if return_features else ())
        return (x0, *extra) if extra else x0


class ShiftGenerator(nn.Module):
    """G(z) = shift + S z, starting where the teacher is."""

    def __init__(self, shift: float) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.full((2, 1, 1), shift))

    def forward(self, z, labels=None, sigma=None):  # one step: sigma is always None
        return self.shift + S * z


def _gaussian_setup(optimizer: type = torch.optim.Adam, **distill: float) -> DMD2:
    torch.manual_seed(0)
    cfg = C.DistillConfig(**{"method": "dmd2", "lambda_reg": 0, "gan_d_weight": 1.0, "batch": 64, "reg_batch": 64,
                             "duration_nimg": 64, "checkpoint_nimg": 64, "log_nimg": 64, "grad_clip": 1e9,
                             "fake_updates_per_gen": 2, **distill})
    args = DistillArgs(cfg, {"P_mean": -0.4, "P_std": 1.0, "weighting": "edm2", "min_snr_gamma": 5.0,
                             "use_uncertainty": False}, None, "", "", [], [], {}, None, None, 0)
    teacher = GaussianScore(0.0, trainable=False)
    fake = ScoreWithHead(GaussianScore(0.0, trainable=True), DiscriminatorHead([2], hidden=16))
    generator = ShiftGenerator(0.0)
    nets = Nets(generator, fake, teacher, None, optimizer(generator.parameters(), lr=0.02),
                optimizer(fake.parameters(), lr=0.02))
    return DMD2(args, nets, _session())


def _gaussian_run(gan_g_weight: float, steps: int = 150, **distill: float) -> float:
    method = _gaussian_setup(gan_g_weight=gan_g_weight, **distill)
    generator = method.nets.generator
    for _ in range(steps):
        fakes = [method.fake_update((1.0 + S * torch.randn(64, 2, 4, 4), None))]
        x = generator(torch.randn(64, 2, 4, 4))
        fakes.append(method.fake_update((1.0 + S * torch.randn(64, 2, 4, 4), None), x, None))
        method.generator_update(x, None, fake_means(fakes))
    return float(generator.shift.detach().mean())


@pytest.mark.slow
def test_on_a_gaussian_the_gan_term_moves_g_from_the_teachers_bias_toward_the_real_data():
    dm_only, with_gan = _gaussian_run(0.0), _gaussian_run(1.0)
    assert abs(dm_only) < 0.15  # distribution matching alone keeps G on the teacher's mean, 0
    assert with_gan > 0.5, with_gan  # the GAN term, trained on real data at mean 1, pulls G most of the way there
    # Balanced, the weight sets which pull wins where they oppose: 3x DM's norm, the real data; 0.3x, the teacher
    assert _gaussian_run(0.0, gan_balance=3.0) > 0.5 and abs(_gaussian_run(0.0, gan_balance=0.3)) < 0.15


def test_gs_dmd2_step_follows_the_gradient_of_l_dm_plus_the_weighted_gan_loss():
    """The step combines the two losses' gradients at G's output and backpropagates their sum through G:
    with plain SGD the parameters move by -lr x the gradient of L_DM + w L_GAN taken the textbook way."""
    for distill in ({"gan_g_weight": 0.3}, {"gan_g_weight": 0.0, "gan_balance": 0.5}):
        method = _gaussian_setup(torch.optim.SGD, adam_beta1=0.0, weight_decay=0.0, **distill)
        nets = method.nets
        nets.fake.score.mean.data.fill_(0.3)  # a fake score that has learned something: L_DM has a gradient
        x_of = lambda: nets.generator(torch.randn(64, 2, 4, 4, generator=torch.Generator().manual_seed(1)))
        torch.manual_seed(2)
        row = method.generator_update(x_of(), None, {"finite": 1.0})
        moved = -(nets.generator.shift.detach().clone() - 0.0) / 0.02
        nets.generator.shift.data.zero_()
        torch.manual_seed(2)  # the same sigmas and noise as the step drew
        x = x_of()
        loss_dm, _ = dm_loss(method, x, None)
        sigma = sample_sigma(64, -0.4, 1.0, None, torch.device("cpu"))
        _, logits = nets.fake(x + sigma.reshape(-1, 1, 1, 1) * torch.randn_like(x), sigma, None, return_logits=True)
        loss_gan = generator_loss(logits)
        if "gan_balance" in distill:  # the weight at which the GAN gradient at x is 0.5 x the DM one's norm
            g_dm, g_gan = (torch.autograd.grad(t, x, retain_graph=True)[0] for t in (loss_dm, loss_gan))
            assert row["gan_weight"] == pytest.approx(float(0.5 * g_dm.norm() / g_gan.norm()), rel=1e-5)
            assert row["gan_grad_ratio"] == pytest.approx(0.5, rel=1e-5)
        else:
            assert row["gan_weight"] == 0.3
        expected, = torch.autograd.grad(loss_dm + row["gan_weight"] * loss_gan, nets.generator.shift)
        torch.testing.assert_close(moved, expected, rtol=1e-4, atol=1e-7)
        assert row["loss_g"] == pytest.approx((loss_dm + row["gan_weight"] * loss_gan).item(), rel=1e-5)


# --- multi-step students ------------------------------------------------------------------------------

def test_a_students_noise_levels_are_the_head_of_a_karras_schedule():
    assert student_sigmas(1) == [80.0]
    assert student_sigmas(2) == pytest.approx([80.0, (80 ** (1 / 7) / 2 + 0.002 ** (1 / 7) / 2) ** 7])
    hi, lo = 80 ** (1 / 7), 0.002 ** (1 / 7)  # 4 steps: levels 0..3 of the 5-level schedule (the 5th is 0.002)
    assert student_sigmas(4) == pytest.approx([(hi + i / 4 * (lo - hi)) ** 7 for i in range(4)])
    assert student_sigmas(4) == pytest.approx([80.0, 17.53, 2.515, 0.1698], rel=1e-3)



def test_sigma_init_moves_the_students_first_level_in_training_the_manifest_and_sampling(pairs_cfg):
    """G(z) = D(s z, s) at s = distill.sigma_init, from the start of training to evaluate's samples."""
    assert student_sigmas(2, 2.5) == pytest.approx([2.5, (2.5 ** (1 / 7) / 2 + 0.002 ** (1 / 7) / 2) ** 7])
    method = _method(_args(pairs_cfg, sigma_init=2.5))
    nets = method.nets
    nets.generator.eval()
    z, labels = method.latents(4)
    with torch.no_grad():
        torch.testing.assert_close(nets.generator(z, labels), nets.real(2.5 * z, torch.full((4,), 2.5), labels))
    cfg = C.load_config("ci", [*TINY, "distill.sigma_init=2.5", "distill.duration_nimg=16"], storage=pairs_cfg.storage)
    dag.run(cfg, until="distill", executor=InlineExecutor())
    model = student_model(_artifact(cfg, "distill"))
    assert model.sigmas == (2.5,)
    net = load_denoiser(_artifact(cfg, "distill"), "student")
    encoder = encoder_from_info(_artifact(cfg, "encode").manifest()["outputs"]["encoder"])
    images, _ = generate(model, net, [5, 6], encoder, "cpu")
    noise, seeded_labels = seeded_noise([5, 6], (3, 16, 16), net.num_classes, "cpu")
    with torch.no_grad():
        x = net(2.5 * noise, torch.full((2,), 2.5), seeded_labels)
    assert np.array_equal(images, encoder.decode(x))
    with pytest.raises(ValueError, match="distill.sigma_init"):
        C.load_config("ci", ["distill.sigma_init=0"])


def test_adam_beta1_is_both_optimizers_first_moment_decay(pairs_cfg):
    for beta1 in (0.0, 0.5):
        nets = DMD2.build_nets(_args(pairs_cfg, adam_beta1=beta1), torch.device("cpu"))
        for opt in (nets.opt_g, nets.opt_f):
            assert [g["betas"] for g in opt.param_groups] == [(beta1, 0.999)]
    with pytest.raises(ValueError, match="distill.adam_beta1"):
        C.load_config("ci", ["distill.adam_beta1=1"])

def test_backward_simulation_is_the_students_own_earlier_step_renoised(pairs_cfg):
    method = _method(_args(pairs_cfg, student_steps=2))
    nets = method.nets
    nets.generator.eval()  # no in-place renormalisation between the two runs compared
    sigmas = student_sigmas(2)
    for seed in range(20):
        torch.manual_seed(seed)
        x, labels = method.student_batch(nets.generator, 4, grad=True)
        torch.manual_seed(seed)  # the same draws, by hand: z and labels, the step, the re-noising
        z, hand_labels = method.latents(4)
        if int(torch.randint(2, ())) == 1:
            with torch.no_grad():
                x1 = nets.generator(z, hand_labels) + sigmas[1] * torch.randn_like(z)  # step 1's input
            torch.testing.assert_close(x, nets.generator(x1, hand_labels, sigma=sigmas[1]).float())
            assert x.requires_grad and torch.equal(labels, hand_labels)
            return
    pytest.fail("no seed drew step 1")


def test_a_two_step_student_trains_and_samples_with_its_two_steps(pairs_cfg):
    cfg = C.load_config("ci", [*TINY, "distill.student_steps=2", "distill.duration_nimg=16"], storage=pairs_cfg.storage)
    dag.run(cfg, until="distill", executor=InlineExecutor())
    distill = _artifact(cfg, "distill")
    assert distill.manifest()["outputs"]["student"] == {"file": "student.safetensors", "config": "student.json",
                                                        "nfe": 2, "sigmas": student_sigmas(2), "nimg": 16,
                                                        "keep": "last"}
    model = student_model(distill)
    assert (model.nfe, model.label, model.sigmas) == (2, "student (2 steps)", tuple(student_sigmas(2)))
    net = load_denoiser(distill, "student")
    encoder = encoder_from_info(_artifact(cfg, "encode").manifest()["outputs"]["encoder"])
    images, labels = generate(model, net, [3, 4], encoder, "cpu")
    noise, seeded_labels = seeded_noise([3, 4], (3, 16, 16), net.num_classes, "cpu")
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]  # each seed's generator: noise, label, re-noise
    for gen in gens:
        torch.randn((3, 16, 16), generator=gen), torch.randint(net.num_classes, (), generator=gen)
    renoise = torch.stack([torch.randn((3, 16, 16), generator=gen) for gen in gens])
    assert not torch.equal(renoise, noise)
    with torch.no_grad():
        g = OneStepGenerator(net)
        x = g(g(noise, seeded_labels) + student_sigmas(2)[1] * renoise, seeded_labels, sigma=student_sigmas(2)[1])
    assert np.array_equal(images, encoder.decode(x)) and np.array_equal(labels, seeded_labels.numpy())
