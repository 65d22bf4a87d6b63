"""distill: a one-step generator from the phema teacher with Distribution Matching Distillation.

    onestep run --config ci --until distill --storage /tmp/onestep

G(z, label) = D_G(s z, s, label) with s = `sigma_init` (DMD: the teacher's sigma_max, 80),
initialised from the teacher variant that made the pairs; the real score is that teacher, frozen;
the fake score is a trainable copy trained on G's detached outputs with the teacher's own loss.
Each generator step combines the distribution-matching loss on a fresh batch with `lambda_reg` x
LPIPS regression on a separate batch of pairs (papers.md, DMD). `fake_updates_per_gen` > 1 is
DMD2's two time-scale rule. `method: dmd2` replaces the regression by DMD2's GAN term: a discriminator
head on the fake score's bottleneck features (`gan_head: encoder`: every encoder level's;
pipeline/diffusion/gan.py), trained with the fake score on real images (the encode shards) and G's,
noised at the same sigma; G adds `gan_g_weight` x its non-saturating GAN loss. Checkpoints, resume and
failures work as in the teacher stage.

Validation (pipeline/metrics/validation.py) watches the student: at the start, every `val_every_nimg`
images and at the end, `val_images` one-step samples from fixed validation seeds are scored with the
probe (fd_probe, class accuracy) into the metrics rows. `keep: best` commits the student of the best
validation (`validation.json` and the manifest say which); fd_probe above `early_stop_ratio` x its
best for `early_stop_patience` validations in a row is a collapse: the run stops there and keeps the best.
With `ema_sigma_rel` > 0 the student is a power-function EMA of G's weights: validation scores it and
distill commits it.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterator

import numpy as np
import torch

from pipeline import report
from pipeline.config import DistillConfig
from pipeline.dag import StageContext
from pipeline.data.encoders import encoder_from_info, lpips_decoder
from pipeline.data.shards import reader
from pipeline.diffusion.dmd import (OneStepGenerator, distribution_matching_loss, fake_score_loss, load_lpips,
                                    lpips_regression_loss, sample_dm_sigma, seeded_student_sample, student_sigmas)
from pipeline.diffusion.gan import (DiscriminatorHead, ScoreWithHead, balanced_gan_weight, discriminator_loss,
                                    generator_loss, head_channels)
from pipeline.diffusion.loss import edm2_error, sample_sigma
from pipeline.diffusion.phema import PowerFunctionEMA
from pipeline.executor import DDPJob, TrainSession
from pipeline.metrics.probe import ProbeFeatures
from pipeline.metrics.validation import Reference, Watch, score
from pipeline.models.edm2 import Denoiser
from pipeline.store import Artifact
from pipeline.models.edm2_release import load_guide
from pipeline.seeds import counts_per_class, mix_seed, scored_labels, validation_seeds
from pipeline.tracking import StageRun
from pipeline.training import (DivergenceGuard, Diverged, MetricsLog, check_diverged, gather_metrics, load_state,
                               mixed_precision, save_state, train_guarded, zero_nonfinite_grads_)
from pipeline.weights import load_network, load_probe, load_reference, save_network

VERSION = "6"  # 2: a seeded random LPIPS backbone; 3: the fake score learns from the DM batch of G; 4: dmd2; 5: validation;
# 6: validation's samples in the data's class proportions (seeds.scored_labels)
UPSTREAM = ("encode", "probe", "teacher", "phema", "pairs")
HELD_CLASSES = 0.8  # a student whose validation class accuracy is under this x its teacher's has lost classes


@dataclass(frozen=True)
class DistillArgs:
    """Everything a training worker needs (picklable)."""

    cfg: DistillConfig
    teacher_loss: dict[str, Any]  # the teacher's P_mean, P_std, weighting, min_snr_gamma, use_uncertainty
    phema: Artifact
    weights: str  # the teacher variant's file in the phema artifact
    guide: str  # URL of the guiding network, folder or EDM2 .pkl ("" = none)
    pair_urls: list[str]  # dmd: the regression pairs
    real_urls: list[str]  # dmd2: the encode shards, real images for the GAN head
    encoder: dict[str, Any]
    probe: Artifact | None  # validation's probe (None: no validation)
    artifact: Artifact
    seed: int
    tracking: StageRun | None = None  # the stage's tracker runs, for rank 0's MetricsLog
    class_counts: list[int] = field(default_factory=list)  # the data's images per class: validation's classes


@dataclass
class Nets:
    generator: OneStepGenerator
    fake: Denoiser | ScoreWithHead  # dmd2: the fake score with its discriminator head
    real: Denoiser
    guide: Denoiser | None
    opt_g: torch.optim.Optimizer
    opt_f: torch.optim.Optimizer
    ema: PowerFunctionEMA | None = None  # G's EMA (ema_sigma_rel), the student when there is one

    def student(self) -> Denoiser:
        """What validation scores and distill commits: G's denoiser, or a copy holding its EMA's weights."""
        net = self.generator.denoiser
        if self.ema is None:
            return net
        ema_net = copy.deepcopy(net)
        ema_net.load_state_dict(self.ema.ema_state(self.ema.sigma_rels[0]), strict=False)  # its float state
        return ema_net


def _adamw(params: Any, lr: float, cfg: DistillConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=(cfg.adam_beta1, 0.999), weight_decay=cfg.weight_decay)


def build_nets(args: DistillArgs, device: torch.device) -> Nets:
    real = load_network(args.phema, "network", args.weights).to(device)
    generator = OneStepGenerator.from_teacher(real, args.cfg.sigma_init).to(device).train()
    generator.net.u_linear.requires_grad_(False)  # G never uses the uncertainty branch
    fake = copy.deepcopy(real).requires_grad_(True).train()
    if args.cfg.method == "dmd2":
        torch.manual_seed(args.seed)  # the head's initial weights
        fake = ScoreWithHead(fake, DiscriminatorHead(head_channels(real, args.cfg.gan_head))).to(device).train()
    guide = load_guide(args.guide).to(device) if args.guide else None
    g_params = [p for p in generator.parameters() if p.requires_grad]
    ema = PowerFunctionEMA(generator.denoiser, [args.cfg.ema_sigma_rel]) if args.cfg.ema_sigma_rel else None
    return Nets(generator, fake, real, guide, _adamw(g_params, args.cfg.lr, args.cfg),
                _adamw(fake.parameters(), args.cfg.fake_lr, args.cfg), ema)


def _step(opt: torch.optim.Optimizer, loss: torch.Tensor, params: list[torch.nn.Parameter],
          clip: float) -> tuple[float, bool]:
    """Backward, non-finite gradients zeroed (as the teacher's), clipping, step: (gradient norm, finite)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    finite = zero_nonfinite_grads_(params)
    norm = torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    return float(norm), finite


def _latents(batch: int, net: Denoiser, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    z = torch.randn(batch, net.img_channels, net.img_resolution, net.img_resolution, device=device)
    labels = torch.randint(net.num_classes, (batch,), device=device) if net.num_classes else None
    return z, labels


def student_batch(nets: Nets, model: torch.nn.Module, args: DistillArgs, batch: int, device: torch.device,
                  grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch of the student's outputs and its labels. A multi-step student's step is drawn at random
    and its input made by backward simulation: the student's own earlier steps (no gradient), each
    output re-noised to the next level; then that step's output (with gradient, if `grad`)."""
    z, labels = _latents(batch, nets.real, device)
    sigmas = student_sigmas(args.cfg.student_steps, args.cfg.sigma_init)
    k = int(torch.randint(len(sigmas), ())) if len(sigmas) > 1 else 0
    x = z
    with torch.no_grad(), mixed_precision(device):
        for j in range(k):  # a training-mode forward renormalises G's weights in place: these come first
            x = nets.generator(x, labels, sigma=sigmas[j] if j else None).float()
            x = x + sigmas[j + 1] * torch.randn_like(x)
    with torch.set_grad_enabled(grad), mixed_precision(device):
        return model(x, labels, sigma=sigmas[k] if k else None).float(), labels


def _real_batch(reals: Iterator, encoder: Any, nets: Nets, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    stored, labels = next(reals)
    return encoder.to_model(stored.to(device)).float(), labels.to(device) if nets.real.num_classes else None


def fake_update(nets: Nets, fake_model: torch.nn.Module, args: DistillArgs, batch: int, device: torch.device,
                x: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                real: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> dict[str, float]:
    """One fake-score step with the teacher's denoising loss on G's outputs `x` (labels), detached;
    without x, on a fresh batch of G (DMD2's extra fake-score updates). With `real` (dmd2: images and
    labels of the same batch size), the discriminator head learns too, from one forward of the fake
    score over G's images and the real ones, noised at the same sigma: its loss x gan_d_weight is added."""
    loss_cfg = args.teacher_loss
    edm2_kwargs = {k: loss_cfg[k] for k in ("weighting", "min_snr_gamma", "use_uncertainty")}
    with mixed_precision(device):
        if x is None:
            x, labels = student_batch(nets, nets.generator, args, batch, device, grad=False)
        x = x.detach().float()
        sigma = sample_sigma(batch, loss_cfg["P_mean"], loss_cfg["P_std"], None, device)
        if real is None:
            loss = fake_score_loss(fake_model, x, labels, sigma, torch.randn_like(x), **edm2_kwargs).loss
            info = {}
        else:
            x_real, real_labels = real
            s = sigma.reshape(-1, 1, 1, 1)
            noised = torch.cat([x + s * torch.randn_like(x), x_real + s * torch.randn_like(x_real)])
            both = None if labels is None else torch.cat([labels, real_labels])
            denoised, u, logits = fake_model(noised, torch.cat([sigma, sigma]), both, return_u=True, return_logits=True)
            loss = edm2_error(denoised[:batch], u[:batch], x, sigma, **edm2_kwargs).loss
            loss_d = discriminator_loss(logits[batch:], logits[:batch])
            info = {"loss_d": loss_d.item(), "d_acc_real": (logits[batch:] > 0).float().mean().item(),
                    "d_acc_fake": (logits[:batch] < 0).float().mean().item()}
            loss = loss + args.cfg.gan_d_weight * loss_d
    _, finite = _step(nets.opt_f, loss, list(nets.fake.parameters()), args.cfg.grad_clip)
    return {"loss_fake": loss.item(), "finite": float(finite), **info}


def _fake_rows(updates: list[dict[str, float]]) -> dict[str, float]:
    """The means of the fake-side updates' numbers; `finite` becomes whether all were."""
    means = {k: sum(u[k] for u in updates) / len(updates) for k in updates[0] if k != "finite"}
    return {**means, "finite": float(all(u["finite"] for u in updates))}


def _dm_loss(nets: Nets, x: torch.Tensor, labels: torch.Tensor | None, args: DistillArgs, batch: int,
             device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    sigma = sample_dm_sigma(batch, None, device)
    return distribution_matching_loss(x, labels, nets.real, nets.fake, sigma, torch.randn_like(x),
                                      guidance=args.cfg.guidance, guide=nets.guide)


def generator_lr(cfg: DistillConfig, nimg: int) -> float:
    """G's learning rate for the step after `nimg` images: a linear warm-up over `lr_rampup_nimg`, so that the
    fake score, which starts as the teacher, can follow G's first moves."""
    return cfg.lr * min((nimg + cfg.batch) / cfg.lr_rampup_nimg, 1.0) if cfg.lr_rampup_nimg else cfg.lr


def _g_step(nets: Nets, loss: torch.Tensor, args: DistillArgs) -> tuple[float, bool]:
    return _step(nets.opt_g, loss, [p for p in nets.generator.parameters() if p.requires_grad], args.cfg.grad_clip)


def _row_of(terms: dict[str, torch.Tensor], loss: torch.Tensor, info: dict[str, torch.Tensor], norm: float,
            finite: bool, fake: dict[str, float]) -> dict[str, float]:
    return {**{k: v.item() for k, v in terms.items()}, "loss_g": loss.item(), "grad_norm": norm,
            "dm_normalizer": float(info["normalizer"].mean()), **{k: v for k, v in fake.items() if k != "finite"},
            "nonfinite_steps": float(not (finite and fake["finite"]))}


def train_step(nets: Nets, gen_model: torch.nn.Module, fake_model: torch.nn.Module, pairs: Iterator,
               to_pixels: Callable[[torch.Tensor], torch.Tensor], lpips: Any, args: DistillArgs, batch: int,
               device: torch.device) -> dict[str, float]:
    """One DMD iteration. DMD2's two time-scale rule first makes fake_updates_per_gen - 1 fake-score updates
    on fresh batches of G. Then G makes the DM batch (fresh z) and the pair batch in one forward; the
    fake score learns from that DM batch, detached; G steps on L_DM, with the updated fake score, plus
    lambda_reg LPIPS(G(pair noise), pair target). (G's no-grad forwards come first: a training-mode
    forward renormalises its weights in place, which would break the graph of the one with grad.)

    DMD's algorithm updates the fake score after G's step; this order gives G a fake score that has
    seen its batch (docs/results.md compares the two). The price: the fake score's training graph and
    G's coexist, so peak memory is about one fake-score step higher."""
    cfg = args.cfg
    fakes = [fake_update(nets, fake_model, args, batch, device) for _ in range(cfg.fake_updates_per_gen - 1)]
    z, labels = _latents(batch, nets.real, device)
    pz, py, plabels = (t.to(device) for t in next(pairs))
    plabels = plabels if nets.real.num_classes else None
    all_labels = None if labels is None else torch.cat([labels, plabels])
    with mixed_precision(device):
        x_all = gen_model(torch.cat([z, pz.float()]), all_labels).float()  # one DDP forward for both losses
    x, x_pairs = x_all[:batch], x_all[batch:]
    fakes.append(fake_update(nets, fake_model, args, batch, device, x, labels))
    with mixed_precision(device):
        loss_dm, info = _dm_loss(nets, x, labels, args, batch, device)
        loss_reg = lpips_regression_loss(lpips, to_pixels(x_pairs), to_pixels(py.float()), cfg.lpips_size)
    loss = loss_dm + cfg.lambda_reg * loss_reg
    norm, finite = _g_step(nets, loss, args)
    return _row_of({"loss_dm": loss_dm, "loss_reg": loss_reg}, loss, info, norm, finite, _fake_rows(fakes))


def generator_update_dmd2(nets: Nets, gen_model: torch.nn.Module, args: DistillArgs, batch: int,
                          device: torch.device, x: torch.Tensor, labels: torch.Tensor | None,
                          fake: dict[str, float]) -> dict[str, float]:
    """G's DMD2 step on its batch x = G(z): L_DM + w x softplus(-D(x noised)), D the head on the fake
    score's features at a sigma from the teacher's training distribution; w is gan_g_weight, or with
    gan_balance the weight that gives the GAN term's gradient at x that multiple of L_DM's norm there.
    Both gradients are taken at x (the fake score and head get none) and G backpropagates their sum."""
    cfg, loss_cfg = args.cfg, args.teacher_loss
    with mixed_precision(device):
        loss_dm, info = _dm_loss(nets, x, labels, args, batch, device)
        sigma = sample_sigma(batch, loss_cfg["P_mean"], loss_cfg["P_std"], None, device)
        _, logits = nets.fake(x + sigma.reshape(-1, 1, 1, 1) * torch.randn_like(x), sigma, labels, return_logits=True)
        loss_gan = generator_loss(logits)
    grad_dm, = torch.autograd.grad(loss_dm, x, retain_graph=True)
    grad_gan, = torch.autograd.grad(loss_gan, x)  # stops at x: G's graph stays for the backward below
    weight = balanced_gan_weight(grad_dm, grad_gan, cfg.gan_balance) if cfg.gan_balance else cfg.gan_g_weight
    surrogate = (x * (grad_dm + weight * grad_gan)).sum()  # its gradient at x is that of L_DM + w L_GAN
    norm, finite = _g_step(nets, surrogate, args)
    ratio = float(weight * grad_gan.norm() / grad_dm.norm().clamp_min(1e-30))
    row = _row_of({"loss_dm": loss_dm, "loss_gan_g": loss_gan}, loss_dm + weight * loss_gan, info, norm, finite, fake)
    return {**row, "gan_weight": float(weight), "gan_grad_ratio": ratio}


def train_step_dmd2(nets: Nets, gen_model: torch.nn.Module, fake_model: torch.nn.Module, reals: Iterator,
                    encoder: Any, args: DistillArgs, batch: int, device: torch.device) -> dict[str, float]:
    """One DMD2 iteration: fake_updates_per_gen fake-score + head updates (each with a batch of real
    images; the last on the batch G then steps on), then G's step (`generator_update_dmd2`)."""
    fakes = [fake_update(nets, fake_model, args, batch, device, real=_real_batch(reals, encoder, nets, device))
             for _ in range(args.cfg.fake_updates_per_gen - 1)]
    x, labels = student_batch(nets, gen_model, args, batch, device, grad=True)
    fakes.append(fake_update(nets, fake_model, args, batch, device, x, labels,
                             real=_real_batch(reals, encoder, nets, device)))
    return generator_update_dmd2(nets, gen_model, args, batch, device, x, labels, _fake_rows(fakes))


def _restore(nets: Nets, watch: Watch, path: str) -> int:
    state = load_state(path)
    nets.generator.load_state_dict(state["generator"])
    nets.fake.load_state_dict(state["fake"])
    nets.opt_g.load_state_dict(state["opt_g"])
    nets.opt_f.load_state_dict(state["opt_f"])
    if nets.ema is not None:
        nets.ema.load_state_dict(state["ema"])
    watch.load(state["watch"])
    return int(state["nimg"])


def _checkpoint(session: TrainSession, nets: Nets, watch: Watch, nimg: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = None
        if session.rank == 0:
            ema = {"ema": nets.ema.state_dict()} if nets.ema is not None else {}
            path = save_state(tmp, {"generator": nets.generator.state_dict(), "fake": nets.fake.state_dict(),
                                    "opt_g": nets.opt_g.state_dict(), "opt_f": nets.opt_f.state_dict(),
                                    "watch": watch.state(), "nimg": nimg, **ema})
        session.report({"nimg": nimg}, path)


@dataclass(frozen=True)
class Validation:
    """What a worker validates with: the probe, its reference statistics, the decoder, its share of the seeds
    and the data's images per class, which class the seeds' samples (seeds.scored_labels; none if empty)."""

    probe: ProbeFeatures
    reference: Reference
    decode: Callable[[torch.Tensor], np.ndarray]
    seeds: list[int]
    class_counts: list[int]

    def labels(self, seeds: list[int], device: torch.device) -> torch.Tensor | None:
        return torch.tensor(scored_labels(seeds, self.class_counts), device=device) if self.class_counts else None


def _validation(args: DistillArgs, session: TrainSession, encoder: Any) -> Validation | None:
    if args.probe is None:
        return None
    seeds = validation_seeds(args.cfg.val_images)[session.rank::session.world_size]
    return Validation(ProbeFeatures(load_probe(args.probe), str(session.device)), load_reference(args.probe),
                      encoder.decode, seeds, args.class_counts)


def _validation_grid(net: Denoiser, sigmas: list[float], val: Validation, device: torch.device) -> np.ndarray:
    """The trackers' picture: the student's samples of the first 8 validation seeds, a row per class (up to 10);
    an unconditional student's of the first 16, in two rows."""
    seeds = validation_seeds(16)
    if not net.num_classes:
        return report.grid([list(val.decode(seeded_student_sample(net, sigmas, s, device)[0])) for s in (seeds[:8], seeds[8:])])
    rows = [seeded_student_sample(net, sigmas, seeds[:8], device, torch.full((8,), c, device=device))[0]
            for c in range(min(net.num_classes, 10))]
    return report.grid([list(val.decode(x)) for x in rows])


def validate(session: TrainSession, args: DistillArgs, nets: Nets, val: Validation, watch: Watch, log: MetricsLog,
             nimg: int) -> dict[str, float]:
    """Score the student (G, or its EMA; in eval mode: no in-place weight renormalisation) on the validation
    seeds, record it in `watch`; the log row's figures, and a grid of samples to the trackers. On a collapse,
    rank 0 says so in one line."""
    net, cfg = nets.student(), args.cfg
    sigmas = student_sigmas(cfg.student_steps, cfg.sigma_init)
    net.eval()
    start = time.perf_counter()
    try:
        figures = score(lambda seeds: seeded_student_sample(net, sigmas, seeds, session.device,
                                                            val.labels(seeds, session.device)),
                        val.decode, val.probe, val.reference, val.seeds, cfg.val_batch, session.all_reduce, session.device)
        if log.wants_images:
            with torch.no_grad():
                log.image("validation/samples", _validation_grid(net, sigmas, val, session.device), nimg)
    finally:
        net.train()
    watch.add(nimg, figures, net.state_dict)
    row = {f"val_{k}": float(v) for k, v in figures.items() if v is not None and k != "count"}
    row["val_seconds"] = time.perf_counter() - start  # validation's cost, beside the steps' img_per_s
    session.report({"nimg": nimg, **row}, None)  # every rank: a sweep's scheduler (Ray Tune) reads it
    if watch.stopped and session.rank == 0:
        sys.stdout.write(f"distill: stopping early at {nimg} images: {watch.stopped}; keeping the student of "
                         f"{watch.best['nimg']} images\n")
    return row


def _validation_due(cfg: DistillConfig, nimg: int) -> bool:
    return bool(cfg.val_every_nimg) and (nimg % cfg.val_every_nimg == 0 or nimg == cfg.duration_nimg)


def _steps(session: TrainSession, args: DistillArgs, nets: Nets, gen_model: torch.nn.Module,
           fake_model: torch.nn.Module, kit: dict[str, Any], nimg: int, steps: int) -> Callable[[], dict[str, float]]:
    """One training iteration of the method, its data stream seeded from (seed, rank, nimg): DMD's
    regression pairs, or DMD2's real images (one batch per fake-side update)."""
    cfg, device, rank, world = args.cfg, session.device, session.rank, session.world_size
    batch, seed = cfg.batch // world, mix_seed(args.seed, rank, nimg)
    if cfg.method == "dmd2":
        reals = iter(reader(args.real_urls, batch, rank=rank, world_size=world, seed=seed, shuffle_buffer=1000,
                            resampled=True, num_batches=steps * cfg.fake_updates_per_gen))
        return partial(train_step_dmd2, nets, gen_model, fake_model, reals, kit["encoder"], args, batch, device)
    pairs = iter(reader(args.pair_urls, cfg.reg_batch // world, rank=rank, world_size=world, seed=seed,
                        shuffle_buffer=1000, resampled=True, num_batches=steps, fields=("noise.npy", "target.npy")))
    return partial(train_step, nets, gen_model, fake_model, pairs, kit["to_pixels"], kit["lpips"], args, batch, device)


def _train_chunk(session: TrainSession, args: DistillArgs, nets: Nets, gen_model: torch.nn.Module,
                 fake_model: torch.nn.Module, kit: dict[str, Any], log: MetricsLog, guard: DivergenceGuard,
                 watch: Watch, nimg: int) -> int:
    """Generator steps from `nimg` to the next checkpoint (or the end, or an early stop), validations
    where due, checkpoint; returns the images seen."""
    cfg, rank = args.cfg, session.rank
    chunk_start = nimg
    chunk_end = min((nimg // cfg.checkpoint_nimg + 1) * cfg.checkpoint_nimg, cfg.duration_nimg)
    steps = (chunk_end - nimg) // cfg.batch
    step = _steps(session, args, nets, gen_model, fake_model, kit, nimg, steps)
    tick, sums = time.perf_counter(), []
    for _ in range(steps):
        torch.manual_seed(mix_seed(args.seed, rank, nimg))
        lr = generator_lr(cfg, nimg)
        for group in nets.opt_g.param_groups:
            group["lr"] = lr
        sums.append({**step(), "lr": lr})
        if not guard.reference:  # this process's first step: the scale the guard holds losses to
            first = _row(session, sums[-1:], nimg, 0, 1.0)
            guard.start(loss_g=first["loss_g"], loss_fake=first["loss_fake"])
        nimg += cfg.batch
        if nets.ema is not None:
            nets.ema.update(nets.generator.denoiser, nimg, cfg.batch)
        guard.step(not sums[-1]["nonfinite_steps"], nimg)
        if nimg % cfg.log_nimg == 0 or nimg == chunk_end:
            row = _row(session, sums, nimg, len(sums) * cfg.batch, time.perf_counter() - tick)
            if kit["validation"] is not None and _validation_due(cfg, nimg):
                row.update(validate(session, args, nets, kit["validation"], watch, log, nimg))
            log.add(row)
            guard.row(row)
            tick, sums = time.perf_counter(), []
            if watch.stopped:
                break
    log.flush(args.artifact, chunk_start)
    if guard.suspect():
        raise Diverged(f"distill diverged at {nimg} images: a loss was out of range at this checkpoint (see "
                       f"metrics.jsonl), so it was not saved. {guard.fix}")
    _checkpoint(session, nets, watch, nimg)
    return nimg


def _falling_back(args: DistillArgs, log: MetricsLog, watch: Watch, chunk: Callable[[int], int], nimg: int) -> int:
    """`chunk(nimg)`; when the divergence guard stops it and a validated best student is kept (keep: best),
    the run stops there and commits that student instead of failing: it says so, and the manifest too."""
    try:
        return chunk(nimg)
    except Diverged as e:
        if watch.best_weights is None:
            raise
        log.flush(args.artifact, nimg)  # the rows up to the divergence, for the curves
        watch.stopped = f"the divergence guard stopped it ({e})"
        return nimg


def _save_student(args: DistillArgs, nets: Nets, watch: Watch) -> None:
    """The student (the best validation's weights with keep: best) and `validation.json`: the curve,
    the validation of the student kept, and why the run stopped early (if it did)."""
    best = args.cfg.keep == "best"
    save_network(args.artifact, "student", nets.student(), watch.best_weights if best else None)
    kept = watch.best if best else (watch.curve[-1] if watch.curve else None)
    args.artifact.write_json("validation.json", {"curve": watch.curve, "kept": kept, "stopped": watch.stopped})


def train_loop(session: TrainSession, args: DistillArgs) -> None:
    """Runs on every DDP worker: generator steps in chunks between checkpoints, validations where due."""
    cfg, device = args.cfg, session.device
    nets = build_nets(args, device)
    watch = Watch(cfg.keep == "best", cfg.early_stop_ratio, cfg.early_stop_patience)
    nimg = session.restore(partial(_restore, nets, watch)) or 0
    gen_model, fake_model = session.wrap(nets.generator), session.wrap(nets.fake)
    encoder = encoder_from_info(args.encoder, str(device))
    kit: dict[str, Any] = {"encoder": encoder, "validation": _validation(args, session, encoder)}
    if cfg.method == "dmd":  # the regression's LPIPS (dmd2 has none)
        kit["to_pixels"] = lpips_decoder(encoder, cfg.lpips_decoder, str(device))
        kit["lpips"] = load_lpips(cfg.lpips_net, cfg.lpips_pretrained, cfg.lpips_weights).to(device)
    log = MetricsLog("distill", cfg.duration_nimg, session.rank, args.tracking)
    if kit["validation"] is not None and nimg == 0:  # the starting point of the curve
        log.add({"nimg": 0, **validate(session, args, nets, kit["validation"], watch, log, 0)})
    guard = DivergenceGuard("distill", cfg.divergence_ratio, cfg.divergence_patience,
                            f"Lower distill.lr and distill.fake_lr (now {cfg.lr:g}, {cfg.fake_lr:g}).")
    chunk = partial(_falling_back, args, log, watch,
                    partial(_train_chunk, session, args, nets, gen_model, fake_model, kit, log, guard, watch))
    if train_guarded(session, nimg, cfg.duration_nimg, chunk, lambda: bool(watch.stopped)) and session.rank == 0:
        _save_student(args, nets, watch)


def _row(session: TrainSession, rows: list[dict[str, float]], nimg: int, images: int, seconds: float) -> dict[str, Any]:
    """Means over the steps since the last row and over the workers; global images/s."""
    keys = sorted(rows[0])
    sums = torch.tensor([sum(r[k] for r in rows) for k in keys], dtype=torch.float64, device=session.device)
    totals = session.all_reduce(sums).tolist()
    means = {k: v / ((1 if k == "nonfinite_steps" else len(rows)) * session.world_size) for k, v in zip(keys, totals)}
    return {"nimg": nimg, **means, "img_per_s": images / seconds}


def run(ctx: StageContext, cfg: DistillConfig, inputs: dict[str, Artifact]) -> dict[str, Any]:
    pairs = inputs["pairs"].manifest()
    teacher_cfg = inputs["teacher"].manifest()["config"]
    loss_keys = ("P_mean", "P_std", "weighting", "min_snr_gamma", "use_uncertainty")
    if cfg.guidance != 1.0 and not pairs["config"]["guide"]:
        raise ValueError(f"distill.guidance = {cfg.guidance} needs a guiding network: set pairs.guide "
                         "(the real score and the pairs use the same guided teacher)")
    encode = inputs["encode"].manifest()["outputs"]
    args = DistillArgs(cfg, {k: teacher_cfg[k] for k in loss_keys}, inputs["phema"],
                       pairs["outputs"]["teacher"]["file"], pairs["config"]["guide"],
                       [inputs["pairs"].path(s) for s in pairs["outputs"]["shards"]],
                       [inputs["encode"].path(s) for s in encode["shards"]], encode["encoder"],
                       inputs["probe"] if cfg.val_every_nimg else None, ctx.artifact, ctx.seed,
                       ctx.tracking, counts_per_class(encode, encode["num_classes"]))
    if cfg.method == "dmd":
        load_lpips(cfg.lpips_net, cfg.lpips_pretrained, cfg.lpips_weights)  # a backbone that cannot be had fails here
        lpips_decoder(encoder_from_info(args.encoder), cfg.lpips_decoder)  # and so does a decoder
    job = DDPJob("distill", ctx.artifact.path("checkpoints"), cfg.num_workers, cfg.use_gpu, cfg.max_failures)
    start = time.perf_counter()
    metrics = ctx.ddp(train_loop, args, job)
    rows = gather_metrics(ctx.artifact)
    check_diverged(metrics, "distill")
    validation = _report_validation(ctx, cfg, pairs)
    kept = validation["kept"] or {}
    return {
        "student": {"file": "student.safetensors", "config": "student.json", "nfe": cfg.student_steps,
                    "sigmas": student_sigmas(cfg.student_steps, cfg.sigma_init),
                    "nimg": kept.get("nimg", rows[-1]["nimg"] if rows else cfg.duration_nimg), "keep": cfg.keep},
        "teacher": pairs["outputs"]["teacher"],
        "validation": validation,
        "metrics": rows[-1] if rows else {},
        "train_wall_time_s": round(time.perf_counter() - start, 1),
    }


def against_teacher(kept: dict[str, Any] | None, pairs: dict[str, Any]) -> dict[str, Any] | None:
    """The kept student's validation figures beside its teacher's on the same seeds: pairs' choice of
    variant (`select: best`) scored every variant on the first validation seeds. None when it did not,
    or scored another number of them (a Fréchet distance's bias moves with the count)."""
    chosen = pairs["outputs"]["teacher"]["sigma_rel"]
    teacher = next((s for s in pairs["outputs"].get("selection", []) if s["sigma_rel"] == chosen), None)
    if not kept or teacher is None or teacher["count"] != kept["count"]:
        return None
    student_acc, teacher_acc = kept.get("class_accuracy"), teacher.get("class_accuracy")
    held = None if student_acc is None or not teacher_acc else student_acc / teacher_acc
    return {"teacher": {**teacher, "num_steps": pairs["config"]["num_steps"]},
            "fd_probe_ratio": kept["fd_probe"] / teacher["fd_probe"], "class_accuracy_ratio": held}


def _report_validation(ctx: StageContext, cfg: DistillConfig, pairs: dict[str, Any]) -> dict[str, Any]:
    """validation.json for the manifest, and log lines on the student kept, on an early stop, and on a
    student that lost its classes (class accuracy under HELD_CLASSES x its teacher's on the same seeds)."""
    validation = ctx.artifact.read_json("validation.json")
    kept, stopped = validation["kept"], validation["stopped"]
    if stopped:
        ctx.log.warning("distill: stopped early: %s; the student kept is the one of %d images", stopped, kept["nimg"])
    if kept:
        accuracy = "" if kept.get("class_accuracy") is None else f", class accuracy {kept['class_accuracy']:.1%}"
        ctx.log.info("distill: the student is the one of %d images (keep: %s): validation fd_probe %.4g%s over %d "
                     "images", kept["nimg"], cfg.keep, kept["fd_probe"], accuracy, kept["count"])
    versus = against_teacher(kept, pairs)
    if versus:
        teacher = versus["teacher"]
        accuracy = "" if teacher.get("class_accuracy") is None else f", class accuracy {teacher['class_accuracy']:.1%}"
        ctx.log.info("distill: its teacher (sigma_rel %g, %d Heun steps) on the same seeds: fd_probe %.4g%s; the "
                     "student's fd_probe is %.2fx", teacher["sigma_rel"], teacher["num_steps"], teacher["fd_probe"],
                     accuracy, versus["fd_probe_ratio"])
        if versus["class_accuracy_ratio"] is not None and versus["class_accuracy_ratio"] < HELD_CLASSES:
            ctx.log.warning("distill: the student has lost its classes: class accuracy %.1f%% on validation against "
                            "its teacher's %.1f%% on the same seeds. Try a lower distill.lr, or compare settings "
                            "with `onestep sweep` (docs/stages.md)", 100 * kept["class_accuracy"],
                            100 * teacher["class_accuracy"])
    return {**validation, "images": cfg.val_images if cfg.val_every_nimg else 0, "every_nimg": cfg.val_every_nimg,
            "against_teacher": versus}
