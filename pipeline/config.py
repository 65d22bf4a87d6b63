"""Typed configuration: one frozen dataclass per stage, YAML presets, `--set` overrides.

A config file is YAML with a section per stage and the top-level fields of `Config`.
It may name `base: PRESET_OR_FILE` to start from another one. Fields marked
`throughput()` change speed, not results: they are left out of cache keys.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.distill import METHODS
from pipeline.seeds import PAIRS_SEED_BASE, VALIDATION_SEED_BASE

CONFIG_DIR = Path(__file__).resolve().parent.parent / "workflows" / "configs"


def throughput(default: Any) -> Any:
    """A field that changes only speed (batch sizes, worker counts): not part of the cache key."""
    return field(default=default, metadata={"throughput": True})


def content(default: str = "") -> Any:
    """A URL field whose cache-key part is what it points to (sha256 of a file, a folder's listing),
    not the URL: another mirror of the same file keeps the key, a changed file changes it."""
    return field(default=default, metadata={"content": True})


def content_fields(section: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(section) if f.metadata.get("content")]


def _check_choice(section: str, name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{section}.{name} = {value!r}: expected one of {', '.join(choices)}")


def _check_positive(section: str, **values: float) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{section}.{name} = {value}: must be > 0")


@dataclass(frozen=True)
class EncodeConfig:
    """Dataset -> WebDataset shards of pixels or VAE latents."""

    source: str = "synthetic"  # synthetic | digits (scikit-learn's 1,797 8x8 digits) | imagefolder | imagenet
    path: str = ""  # dataset folder URL (imagefolder, imagenet)
    resolution: int = 32  # output images are resolution x resolution (ADM centre crop)
    num_images: int = 2000  # synthetic: how many; digits, folders: a seeded sample of N, every class in proportion (0 = all)
    num_classes: int = 10  # synthetic only; folders take it from their class folders
    encoder: str = "rgb"  # rgb (pixels in [-1, 1]) | vae (posterior mean and std)
    vae: str = "stabilityai/sd-vae-ft-mse"  # hub id, local folder or fsspec URL
    shard_size: int = 1000  # samples per shard
    max_corrupt_fraction: float = 0.01  # above this fraction of unreadable images the stage fails
    batch: int = throughput(64)  # images per encoder call
    num_tasks: int = throughput(0)  # 0: one task per shard; else shards grouped into this many tasks
    num_cpus: float = throughput(1.0)  # per task
    num_gpus: float = throughput(0.0)  # per task (1 on GPU clusters for the VAE)

    def __post_init__(self) -> None:
        _check_choice("encode", "source", self.source, ("synthetic", "digits", "imagefolder", "imagenet"))
        _check_choice("encode", "encoder", self.encoder, ("rgb", "vae"))
        _check_positive("encode", resolution=self.resolution, shard_size=self.shard_size,
                        batch=self.batch, num_cpus=self.num_cpus)
        if self.source == "synthetic" and (self.num_images <= 0 or self.num_classes <= 0):
            raise ValueError("encode.num_images and encode.num_classes must be > 0 for the synthetic source")
        if self.source in ("imagefolder", "imagenet") and not self.path:
            raise ValueError(f"encode.source = {self.source} needs encode.path (the dataset folder URL)")
        if not 0.0 <= self.max_corrupt_fraction <= 1.0:
            raise ValueError("encode.max_corrupt_fraction must be in [0, 1]")


@dataclass(frozen=True)
class TeacherConfig:
    """EDM2 training (docs/algorithms.md, "EDM2 loss and learned uncertainty", "Learning rate" and
    "Power-function EMA and post-hoc EMA"), or a teacher NVIDIA released: `source: edm2-release` (a
    post-hoc reconstruction .pkl, used as it is) or `edm2-snapshots` (a folder of EDM2's raw EMA
    snapshots, which phema reconstructs)."""

    source: str = "train"  # train | edm2-release | edm2-snapshots
    release: str = content()  # edm2-release: URL of the .pkl; edm2-snapshots: URL of the folder
    preset: str = "demo"  # network: XS, S, M, L, XL, XXL, or the small ci / demo
    channels: int | None = None  # architecture overrides of the preset
    channel_mult: tuple[int, ...] | None = None
    num_blocks: int | None = None
    attn_resolutions: tuple[int, ...] | None = None
    dropout: float | None = None
    conditional: bool = True  # class-conditional on the dataset's labels
    P_mean: float = -0.8  # log-normal sigma of the training noise
    P_std: float = 1.6
    weighting: str = "edm2"  # edm2 | min_snr (Min-SNR-gamma with SNR = 1/sigma^2)
    min_snr_gamma: float = 5.0
    use_uncertainty: bool = True  # EDM2's learned loss weighting u(sigma)
    lr: float = 0.012  # reference learning rate
    lr_decay_batches: int = 70000  # t_ref: lr = lr / sqrt(max(t / t_ref, 1)), t in batches
    lr_rampup_nimg: int = 10_000_000  # linear warm-up length in images
    batch: int = 2048  # global batch in images
    duration_nimg: int = 2048 << 20
    ema_sigma_rels: tuple[float, ...] = (0.05, 0.10)
    snapshot_nimg: int = 8 << 20  # EMA snapshots for post-hoc EMA, every this many images
    checkpoint_nimg: int = 32 << 20  # resumable training state, every this many images
    shuffle_buffer: int = 1000  # samples
    batch_gpu: int = throughput(0)  # per worker and pass; 0 = batch / num_workers (no accumulation)
    num_workers: int = throughput(1)  # DDP workers (one GPU each with use_gpu)
    use_gpu: bool = throughput(False)
    compile: bool = throughput(False)  # torch.compile the network
    max_failures: int = throughput(2)  # worker losses survived by resuming from the last checkpoint
    log_nimg: int = throughput(1 << 20)  # a metrics row every this many images
    # Divergence guard (pipeline/training.py: DivergenceGuard); not part of the key: a run it does not stop is the same run
    divergence_ratio: float = throughput(100.0)  # a logged loss above this x max(|first step's|, 1) ...
    divergence_patience: int = throughput(3)  # ... for this many log intervals, or this many non-finite steps, in a row

    def __post_init__(self) -> None:
        _check_choice("teacher", "source", self.source, ("train", "edm2-release", "edm2-snapshots"))
        if (self.source == "train") == bool(self.release):
            raise ValueError(f"teacher.release = {self.release!r} with teacher.source = {self.source}: a released "
                             "teacher needs teacher.release (the .pkl, or the folder of snapshots), training one "
                             "takes none")
        _check_choice("teacher", "weighting", self.weighting, ("edm2", "min_snr"))
        _check_positive("teacher", batch=self.batch, duration_nimg=self.duration_nimg, lr=self.lr,
                        P_std=self.P_std, snapshot_nimg=self.snapshot_nimg, log_nimg=self.log_nimg,
                        checkpoint_nimg=self.checkpoint_nimg, num_workers=self.num_workers,
                        divergence_ratio=self.divergence_ratio, divergence_patience=self.divergence_patience)
        for name in ("duration_nimg", "snapshot_nimg", "checkpoint_nimg"):
            if getattr(self, name) % self.batch:
                raise ValueError(f"teacher.{name} = {getattr(self, name)} must be a multiple of teacher.batch = {self.batch}")
        per_pass = self.num_workers * self.batch_per_worker
        if self.batch % per_pass:
            raise ValueError(f"teacher.batch = {self.batch} is not divisible by num_workers x batch_gpu = "
                             f"{self.num_workers} x {self.batch_per_worker}: change teacher.batch_gpu")
        for s in self.ema_sigma_rels:
            if not 0 < s < 0.2887:
                raise ValueError(f"teacher.ema_sigma_rels: {s} is outside (0, 0.2887)")

    @property
    def batch_per_worker(self) -> int:
        return self.batch_gpu or self.batch // self.num_workers

    def network_overrides(self) -> dict[str, Any]:
        names = ("channels", "channel_mult", "num_blocks", "attn_resolutions", "dropout")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


@dataclass(frozen=True)
class ProbeConfig:
    """A small classifier trained on the dataset: the feature network of the offline metrics."""

    enabled: bool = True  # false: evaluate without the probe's metrics (e.g. a dataset of one class)
    num_images: int = 0  # the first N samples of the dataset (0 = all)
    holdout: float = 0.1  # fraction held out, by dataset index: held-out accuracy and evaluate's real row
    resolution: int = 0  # the classifier's input size; 0 = the images' own
    channels: tuple[int, ...] = (32, 64, 128)  # per level, two 3x3 convolutions each
    feature_dim: int = 128  # penultimate features (fd_probe, precision/recall)
    epochs: int = 20
    batch: int = 128
    lr: float = 2e-3  # AdamW, cosine decay
    weight_decay: float = 5e-4
    ref_images: int = 10000  # training-split features kept as precision/recall's real manifold
    num_cpus: float = throughput(1.0)  # per task (training is one task)
    num_gpus: float = throughput(0.0)

    def __post_init__(self) -> None:
        _check_positive("probe", epochs=self.epochs, batch=self.batch, lr=self.lr, feature_dim=self.feature_dim,
                        ref_images=self.ref_images, num_cpus=self.num_cpus)
        if not 0 < self.holdout < 1:
            raise ValueError(f"probe.holdout = {self.holdout}: must be in (0, 1)")
        if self.num_images < 0 or self.resolution < 0:
            raise ValueError("probe.num_images and probe.resolution must be >= 0 (0 = all / the images' own size)")
        if not self.channels:
            raise ValueError("probe.channels is empty: name at least one level's width")


@dataclass(frozen=True)
class RefstatsConfig:
    """Reference statistics of pretrained feature networks: Inception (FID) and DINOv2 (FD_DINOv2)."""

    stats: str = content()  # URL of a reference npz (mu, sigma) of Inception to use instead of computing them
    # Inception for refstats AND evaluate: "auto" (clean-fid's download; skipped, and said so, if it
    # cannot be had), "clean-fid" (the same, but an error if it cannot), a path/URL of the TorchScript
    # file (offline clusters), "random" (fixed random weights: "FD (random-weight Inception)", never
    # FID), or "" (no FID).
    inception_weights: str = "auto"
    # DINOv2 ViT-L/14 for FD_DINOv2: "auto" (the hub; skipped, and said so, if it cannot be had),
    # "hub" (an error if it cannot), a path/URL of model.safetensors or dinov2_vitl14_pretrain.pth, or "".
    dinov2_weights: str = "auto"
    num_images: int = 0  # 0: every sample of the dataset
    batch: int = throughput(64)
    images_per_task: int = throughput(1000)  # a task takes a range of at most this many samples of one shard
    num_cpus: float = throughput(1.0)
    num_gpus: float = throughput(0.0)

    def __post_init__(self) -> None:
        _check_positive("refstats", batch=self.batch, images_per_task=self.images_per_task)
        if self.num_images < 0:
            raise ValueError("refstats.num_images must be >= 0 (0 = the whole dataset)")
        if self.stats and self.inception_weights in ("", "random"):
            raise ValueError(f"refstats.stats holds statistics of the real Inception, which cannot be compared with "
                             f"refstats.inception_weights={self.inception_weights!r}: set "
                             "refstats.inception_weights=clean-fid (or a path of inception-2015-12-05.pt), or leave "
                             "refstats.stats empty")


@dataclass(frozen=True)
class PhemaConfig:
    """Post-hoc EMA: reconstruct EMA profiles of any length from the teacher's snapshots."""

    sigma_rels: tuple[float, ...] = (0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25)
    nimg: int = 0  # reconstruction time in images; 0 = the last snapshot
    targets_per_task: int = throughput(2)  # Ray tasks each stream the snapshots for this many targets
    num_cpus: float = throughput(1.0)

    def __post_init__(self) -> None:
        _check_positive("phema", targets_per_task=self.targets_per_task)
        for s in self.sigma_rels:
            if not 0 < s < 0.2887:
                raise ValueError(f"phema.sigma_rels: {s} is outside (0, 0.2887), the range of power-function EMAs")
        if not self.sigma_rels:
            raise ValueError("phema.sigma_rels is empty: name at least one EMA length")


@dataclass(frozen=True)
class PairsConfig:
    """DMD's regression pairs: (noise, teacher output) from the multi-step sampler."""

    # fixed: the teacher is the phema variant at sigma_rel | best: every phema variant samples `select_images`
    # validation seeds with this stage's sampler, scored by the probe; the lowest fd_probe is the teacher
    select: str = "fixed"
    sigma_rel: float = 0.1  # select: fixed's variant (one of phema.sigma_rels)
    select_images: int = 256
    num_pairs: int = 25000  # DMD used 25,000 for ImageNet-64; 0 for distill.method=dmd2, which uses none
    num_steps: int = 256  # Heun steps (DMD used 256)
    guidance: float = 1.0  # w != 1 needs `guide`
    # The guiding network (e.g. an unconditional teacher): a folder with network.json + network.safetensors,
    # or an EDM2 release .pkl (e.g. edm2-img512-xs-uncond-2147483-0.045.pkl)
    guide: str = content()
    seed: int = PAIRS_SEED_BASE  # pair i uses seed `seed + i` (pipeline/seeds.py: apart from evaluate's and validation's)
    pairs_per_shard: int = 1000
    batch: int = throughput(64)
    num_cpus: float = throughput(1.0)
    num_gpus: float = throughput(0.0)
    spread: bool = throughput(False)  # spread the tasks over the nodes (Ray SPREAD strategy)

    def __post_init__(self) -> None:
        _check_positive("pairs", num_steps=self.num_steps, pairs_per_shard=self.pairs_per_shard, batch=self.batch,
                        select_images=self.select_images)
        _check_choice("pairs", "select", self.select, ("fixed", "best"))
        if self.num_pairs < 0:
            raise ValueError(f"pairs.num_pairs = {self.num_pairs}: must be >= 0 (0: no pairs, for distill.method=dmd2)")
        if self.guidance != 1.0 and not self.guide:
            raise ValueError(f"pairs.guidance = {self.guidance} needs pairs.guide (a folder with the guiding "
                             "network's network.json + network.safetensors), or set pairs.guidance=1")


@dataclass(frozen=True)
class DistillConfig:
    """DMD: a one-step generator from the phema teacher (docs/algorithms.md, "One-step generator" to
    "DMD2: two time-scale update and GAN")."""

    lr: float = 2e-6  # generator and fake score (AdamW, betas (adam_beta1, 0.999), weight decay 0.01)
    fake_lr: float = 2e-6
    lr_rampup_nimg: int = 0  # the generator's lr grows linearly over this many images (0: none)
    adam_beta1: float = 0.9  # DMD: 0.9; 0 (as GANs are trained) damps the two players' oscillation in short runs
    weight_decay: float = 0.01
    grad_clip: float = 10.0
    batch: int = 336  # generator images per step for the distribution-matching loss (global)
    reg_batch: int = 336  # regression pairs per step (global), a separate batch as in DMD
    # dmd: DM + lambda_reg x LPIPS regression on the pairs | dmd2: DM + a GAN head on the fake score,
    # trained on real images (the encode shards), no pairs (set pairs.num_pairs=0 and lambda_reg=0)
    method: str = "dmd"
    lambda_reg: float = 0.25  # 0 drops the regression loss (DMD2)
    fake_updates_per_gen: int = 1  # 1 = DMD; 5 = DMD2's two time-scale rule
    gan_g_weight: float = 3e-3  # dmd2: weight of G's GAN loss (DMD2, ImageNet)
    gan_d_weight: float = 1e-2  # dmd2: weight of the head's GAN loss beside the fake score's denoising loss
    # dmd2: what the discriminator head reads of the fake score: its UNet's bottleneck (DMD2) | every
    # encoder level's output (a multi-level head, as ADD's and LADD's: it sees the fine detail too)
    gan_head: str = "bottleneck"
    # dmd2, instead of gan_g_weight (set it to 0): G's GAN weight chosen each step to make its gradient at
    # G's output this multiple of the DM gradient's norm there (DMD2's authors: 1, then a search around it)
    gan_balance: float = 0.0
    student_steps: int = 1  # dmd2: 2 or 4 for DMD2's multi-step student (trained with backward simulation)
    # The student's first noise level: G(z) = D_G(s z, s), and its steps' Karras schedule starts there.
    # DMD: 80 (the teacher's sigma_max), where the teacher's output hardly depends on z; SiD: 2.5
    sigma_init: float = 80.0
    lpips_net: str = "vgg"  # vgg (DMD) | alex | squeeze
    lpips_pretrained: bool = True  # False: random backbone (offline demo/ci; not a perceptual metric)
    lpips_weights: str = ""  # path/URL of torchvision's backbone file (offline clusters); "" = torch hub
    lpips_size: int = 224  # images are upsampled to this before LPIPS (DMD: 224)
    lpips_decoder: str = ""  # latent models: a lighter decoder for LPIPS (AutoencoderTiny, e.g. madebyollin/taesd)
    guidance: float = 1.0  # for the real score (the fake score stays unguided); w != 1 needs pairs.guide
    duration_nimg: int = 76190 * 336  # generator images (~25.6M; multiples of the batch)
    checkpoint_nimg: int = 2976 * 336
    # Validation (pipeline/metrics/validation.py): at the start, every val_every_nimg generator images and
    # at the end, val_images samples from fixed seeds (disjoint from evaluate's), scored with the probe
    val_every_nimg: int = 3000 * 336  # a multiple of log_nimg; 0: no validation (then keep: last)
    val_images: int = 5000
    keep: str = "best"  # best: the student of the validation with the lowest fd_probe | last: the last step's
    # The student is a power-function EMA of G's weights (EDM2's, at this sigma_rel; 0: G's own weights):
    # validation scores it, keep chooses among its validations, and it is what distill commits
    ema_sigma_rel: float = 0.0
    early_stop_ratio: float = 2.0  # a collapse: validation fd_probe above this x its best ...
    early_stop_patience: int = 3  # ... for this many validations in a row stops a keep: best run (0: never)
    val_batch: int = throughput(64)  # validation images per forward and rank
    log_nimg: int = throughput(300 * 336)
    num_workers: int = throughput(1)
    use_gpu: bool = throughput(False)
    max_failures: int = throughput(2)
    # Divergence guard (pipeline/training.py: DivergenceGuard); not part of the key: a run it does not stop is the same run
    divergence_ratio: float = throughput(100.0)  # a logged loss above this x max(|first step's|, 1) ...
    divergence_patience: int = throughput(3)  # ... for this many log intervals, or this many non-finite steps, in a row

    def __post_init__(self) -> None:
        _check_choice("distill", "lpips_net", self.lpips_net, ("vgg", "alex", "squeeze"))
        _check_choice("distill", "method", self.method, tuple(METHODS))
        _check_choice("distill", "gan_head", self.gan_head, ("bottleneck", "encoder"))
        if self.student_steps not in (1, 2, 4):
            raise ValueError(f"distill.student_steps = {self.student_steps}: choose 1, 2 or 4")
        if self.student_steps > 1 and self.method != "dmd2":
            raise ValueError("distill.student_steps > 1 (a multi-step student) needs distill.method=dmd2 "
                             "(DMD's regression pairs are one-step)")
        if self.gan_balance < 0:
            raise ValueError(f"distill.gan_balance = {self.gan_balance}: must be >= 0 (0: a fixed gan_g_weight)")
        if self.gan_balance and self.gan_g_weight:
            raise ValueError(f"distill.gan_balance = {self.gan_balance} sets G's GAN weight each step, but "
                             f"distill.gan_g_weight = {self.gan_g_weight} asks for a fixed one: set one of them to 0")
        if not 0 <= self.adam_beta1 < 1:
            raise ValueError(f"distill.adam_beta1 = {self.adam_beta1}: must be in [0, 1)")
        if not self.sigma_init > 0.002:
            raise ValueError(f"distill.sigma_init = {self.sigma_init}: must be above the schedules' sigma_min, 0.002")
        if self.method == "dmd2" and self.lambda_reg:
            raise ValueError(f"distill.method=dmd2 has no regression loss, but distill.lambda_reg = {self.lambda_reg}: "
                             "set distill.lambda_reg=0 (and pairs.num_pairs=0)")
        if self.lpips_weights and not self.lpips_pretrained:
            raise ValueError("distill.lpips_weights is set but distill.lpips_pretrained = false asks for a "
                             "random backbone: drop one of them")
        _check_positive("distill", lr=self.lr, fake_lr=self.fake_lr, batch=self.batch, reg_batch=self.reg_batch,
                        duration_nimg=self.duration_nimg, checkpoint_nimg=self.checkpoint_nimg,
                        fake_updates_per_gen=self.fake_updates_per_gen, lpips_size=self.lpips_size,
                        num_workers=self.num_workers, log_nimg=self.log_nimg,
                        divergence_ratio=self.divergence_ratio, divergence_patience=self.divergence_patience)
        for name in ("duration_nimg", "checkpoint_nimg", "log_nimg"):
            if getattr(self, name) % self.batch:
                raise ValueError(f"distill.{name} = {getattr(self, name)} must be a multiple of distill.batch = {self.batch}")
        self._check_validation()
        for name in ("batch", "reg_batch"):
            if getattr(self, name) % self.num_workers:
                raise ValueError(f"distill.{name} = {getattr(self, name)} is not divisible by "
                                 f"distill.num_workers = {self.num_workers}")


    def _check_validation(self) -> None:
        _check_choice("distill", "keep", self.keep, ("best", "last"))
        _check_positive("distill", val_images=self.val_images, val_batch=self.val_batch)
        if self.val_every_nimg < 0 or self.early_stop_patience < 0 or self.lr_rampup_nimg < 0:
            raise ValueError("distill.val_every_nimg, early_stop_patience and lr_rampup_nimg must be >= 0 (0 = off)")
        if self.val_every_nimg % self.log_nimg:
            raise ValueError(f"distill.val_every_nimg = {self.val_every_nimg} must be a multiple of distill.log_nimg "
                             f"= {self.log_nimg} (a validation's figures go into that log row)")
        if not self.val_every_nimg and self.keep == "best":
            raise ValueError("distill.keep=best chooses the student from validations, but distill.val_every_nimg = 0 "
                             "turns validation off: set distill.val_every_nimg, or distill.keep=last")
        if self.early_stop_ratio <= 1:
            raise ValueError(f"distill.early_stop_ratio = {self.early_stop_ratio}: must be > 1 (x the best fd_probe)")
        if not 0 <= self.ema_sigma_rel < 0.2887:
            raise ValueError(f"distill.ema_sigma_rel = {self.ema_sigma_rel}: must be in [0, 0.2887), the range of "
                             "power-function EMAs (0: no EMA, the student is G's own weights)")


@dataclass(frozen=True)
class EvalConfig:
    """Every phema variant (multi-step sampler), the one-step student and held-out real images,
    on the same seeds: probe metrics, FID and FD_DINOv2 where refstats has them, per-class grids."""

    num_images: int = 50000  # generated images per model (and held-out real images, at most)
    num_steps: int = 32  # Heun steps for the teacher variants (2N-1 evaluations)
    grid_rows: int = 10  # classes shown in the grids, one per row (spread over the dataset's classes)
    grid_columns: int = 8  # samples per row, beside as many real images of the class
    images_per_task: int = throughput(1000)
    batch: int = throughput(64)
    num_cpus: float = throughput(1.0)
    num_gpus: float = throughput(0.0)

    def __post_init__(self) -> None:
        _check_positive("eval", num_images=self.num_images, num_steps=self.num_steps, grid_rows=self.grid_rows,
                        grid_columns=self.grid_columns, images_per_task=self.images_per_task, batch=self.batch)
        if self.num_images < 2:
            raise ValueError(f"eval.num_images = {self.num_images}: the metrics need at least 2 images per model")


@dataclass(frozen=True)
class EstimateConfig:
    """The per-GPU rates `--dry-run` turns work into GPU-hours (pipeline/estimate.py). Not a stage:
    never part of a cache key. A rate of 0 is not stated: that part's GPU-hours are not shown."""

    gpu: str = ""  # what the rates are for, e.g. "H100 SXM, bf16"
    basis: str = "not stated"  # where the rates come from: measured (bench.py gpu), published, or derived
    train_img_per_s: float = 0.0  # teacher training images/s per GPU (forward + backward)
    denoiser_img_per_s: float = 0.0  # denoiser forward evaluations (images)/s per GPU: samplers, distill
    encode_img_per_s: float = 0.0  # VAE encoder images/s per GPU (latent datasets)
    decode_img_per_s: float = 0.0  # VAE decoder images/s per GPU (latent datasets: probe, refstats, LPIPS, evaluate)

    def __post_init__(self) -> None:
        for name in ("train_img_per_s", "denoiser_img_per_s", "encode_img_per_s", "decode_img_per_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"estimate.{name} = {getattr(self, name)}: must be >= 0 (0 = not stated)")


TRACKING_BACKENDS = ("tensorboard", "mlflow", "wandb")


@dataclass(frozen=True)
class TrackingConfig:
    """Live experiment tracking (pipeline/tracking.py). Not a stage: never part of a cache key, and a
    backend that is down costs one warning line, never the run. Credentials come from the environment
    only (MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/_PASSWORD, WANDB_API_KEY)."""

    backends: tuple[str, ...] = ("tensorboard",)  # any of: tensorboard (event files in each training artifact), mlflow, wandb
    mlflow_uri: str = ""  # http(s)://HOST:PORT of a tracking server, or sqlite:///FILE.db; "" = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = "onestep"  # the MLflow experiment and the W&B project
    wandb_mode: str = "online"  # online | offline (run folders under wandb_dir, uploaded later by `wandb sync`)
    wandb_dir: str = ""  # W&B writes its run folders under DIR/wandb/ ("" = the current folder)
    timeout_s: float = 10.0  # per request to a tracking server; a backend that fails is dropped for the run

    def __post_init__(self) -> None:
        for name in self.backends:
            _check_choice("tracking", "backends", name, TRACKING_BACKENDS)
        if len(set(self.backends)) != len(self.backends):
            raise ValueError(f"tracking.backends = {list(self.backends)}: a backend is named twice")
        _check_choice("tracking", "wandb_mode", self.wandb_mode, ("online", "offline"))
        _check_positive("tracking", timeout_s=self.timeout_s)
        if self.mlflow_uri and "://" not in self.mlflow_uri and self.mlflow_uri != "databricks":
            raise ValueError(f"tracking.mlflow_uri = {self.mlflow_uri!r}: MLflow 3 keeps local runs in a database: use "
                             f"sqlite:///{self.mlflow_uri.rstrip('/')}.db, or http://HOST:PORT of a tracking server")


@dataclass(frozen=True)
class Config:
    """The whole run: where artifacts live, how work is executed, and every stage's config."""

    preset: str = "demo"
    storage: str = "./artifacts"
    shared_storage: bool = False  # a local storage path that every node mounts (NFS, Lustre)
    executor: str = "ray"  # ray | inline (same calls in-process, for debugging)
    seed: int = 0
    max_in_flight: int = throughput(64)  # Ray tasks submitted at once per map
    lease_timeout_s: float = throughput(120.0)  # a writer's lease with an older heartbeat is taken over
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    refstats: RefstatsConfig = field(default_factory=RefstatsConfig)
    phema: PhemaConfig = field(default_factory=PhemaConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    estimate: EstimateConfig = field(default_factory=EstimateConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        _check_choice("config", "executor", self.executor, ("ray", "inline"))
        if self.distill.method == "dmd2" and self.pairs.num_pairs:
            raise ValueError(f"distill.method=dmd2 uses no regression pairs: set pairs.num_pairs=0 (now "
                             f"{self.pairs.num_pairs}) so that the pairs stage makes none")
        if self.distill.method == "dmd" and self.distill.lambda_reg and not self.pairs.num_pairs:
            raise ValueError("distill.method=dmd regresses onto pairs (distill.lambda_reg = "
                             f"{self.distill.lambda_reg}) but pairs.num_pairs = 0: set pairs.num_pairs, "
                             "or distill.lambda_reg=0")
        self._check_pair_seeds()
        self._check_probe_users()
        _check_positive("config", max_in_flight=self.max_in_flight, lease_timeout_s=self.lease_timeout_s)


    def _check_probe_users(self) -> None:
        users = {"distill validation (off: distill.val_every_nimg=0 distill.keep=last)": self.distill.val_every_nimg,
                 "pairs.select=best (off: pairs.select=fixed and a pairs.sigma_rel)": self.pairs.select == "best"}
        on = [name for name, used in users.items() if used]
        if on and not self.probe.enabled:
            one = len(on) == 1
            raise ValueError(f"probe.enabled = false, but {' and '.join(on)} {'needs' if one else 'need'} the probe: "
                             f"turn {'it' if one else 'them'} off, or enable the probe")

    def _check_pair_seeds(self) -> None:
        """The pairs' noise must not be evaluate's or validation's: a student scored on the noise it was
        regressed on looks closer to its teacher than it is (torch keeps a seed's low 32 bits only)."""
        lo, hi = self.pairs.seed, self.pairs.seed + self.pairs.num_pairs
        if self.pairs.num_pairs and (lo < self.eval.num_images or hi > VALIDATION_SEED_BASE):
            raise ValueError(f"pairs.seed = {lo}: the pairs' seeds [{lo}, {hi}) overlap evaluate's [0, "
                             f"{self.eval.num_images}) or validation's (from {VALIDATION_SEED_BASE}): leave pairs.seed at "
                             f"its default {PAIRS_SEED_BASE}")


@dataclass(frozen=True)
class _Field:
    name: str
    hint: Any
    type_cls: type | None  # the dataclass of a section, else None


def _fields(cls: type) -> list[_Field]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        out.append(_Field(f.name, hint, hint if dataclasses.is_dataclass(hint) else None))
    return out


def result_fields(section: Any) -> dict[str, Any]:
    """The fields of a section that affect results (the cache key's part of the config)."""
    return {
        f.name: _plain(getattr(section, f.name))
        for f in dataclasses.fields(section)
        if not f.metadata.get("throughput")
    }


def to_dict(obj: Any) -> Any:
    """A config (or section) as plain JSON/YAML-able data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    return _plain(obj)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _coerce(where: str, hint: Any, value: Any) -> Any:
    """Check `value` against a field's type hint; ints widen to floats, lists become tuples."""
    origin = typing.get_origin(hint)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        item = typing.get_args(hint)[0]
        return tuple(_coerce(where, item, v) for v in value)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else _coerce(where, options[0], value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "1e-9" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ValueError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], section: str) -> Any:
    fields = {f.name: f for f in _fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown key {', '.join(section + k for k in unknown)}; "
            f"valid keys{' of ' + section.rstrip('.') if section else ''}: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        f = fields[name]
        if f.type_cls is not None:
            if not isinstance(value, dict):
                raise ValueError(f"{section}{name}: expected a mapping of fields, got {value!r}")
            kwargs[name] = _build(f.type_cls, value, f"{section}{name}.")
        else:
            kwargs[name] = _coerce(f"{section}{name}", f.hint, value)
    return cls(**kwargs)


def section_from_dict(cls: type, data: dict[str, Any]) -> Any:
    """A config section as a committed manifest recorded it (fields it no longer has are left out)."""
    names = {f.name for f in _fields(cls)}
    return _build(cls, {k: v for k, v in data.items() if k in names}, "")


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def preset_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _load_yaml(name_or_path: str) -> dict[str, Any]:
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise ValueError(f"unknown preset {name_or_path!r}; presets: {', '.join(preset_names())} "
                             "(or pass the path of a YAML file)")
    elif not path.exists():
        raise ValueError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a mapping at the top level")
    base = data.pop("base", None)
    data.setdefault("preset", path.stem)
    return _deep_merge(_load_yaml(base), data) if base else data


def parse_override(text: str) -> tuple[list[str], Any]:
    """'teacher.lr=0.01' -> (['teacher', 'lr'], 0.01); the value is parsed as YAML."""
    if "=" not in text:
        raise ValueError(f"--set {text!r}: expected KEY=VALUE, e.g. --set encode.resolution=64")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    return key.strip().split("."), value


def load_config(preset: str = "demo", overrides: list[str] = (), storage: str | None = None) -> Config:
    """Preset name or YAML path, then `--set a.b=v` overrides, then `--storage`; validated."""
    data = _load_yaml(preset)
    for text in overrides:
        keys, value = parse_override(text)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        data = _deep_merge(data, nested)
    if storage is not None:
        data["storage"] = storage
    return _build(Config, data, "")


def dump(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
