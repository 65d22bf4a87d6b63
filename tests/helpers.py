"""Small on-disk datasets and models for tests: plain functions, not fixtures."""

from __future__ import annotations

import contextlib
import io
import tarfile
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.executor import InlineExecutor, RayExecutor, Resources

# A ci-preset run small enough for the pairs stage's tests: a 16-channel teacher trained on
# 32 images, two phema variants, 12 pairs of 4 Heun steps from seeds 100..111 of the variant at sigma_rel 0.1.
PAIRS_TINY = [
    "encode.num_images=32", "encode.shard_size=32", "teacher.channels=16", "teacher.batch=4",
    "teacher.snapshot_nimg=8", "teacher.checkpoint_nimg=16", "teacher.duration_nimg=32",
    "teacher.log_nimg=8", "teacher.lr_rampup_nimg=0", "teacher.shuffle_buffer=32",
    "phema.sigma_rels=[0.05,0.1]", "pairs.sigma_rel=0.1", "pairs.num_pairs=12", "pairs.num_steps=4",
    "pairs.batch=5", "pairs.seed=100", "pairs.select=fixed",
]

# The distill stage's tests: PAIRS_TINY's teacher, 16 pairs, 8-image generator batches, no validation
# (VALIDATION turns it on; the probe trains long enough on the 32 images for its features to tell them
# apart); DMD2 switches to the GAN on real images, without pairs.
DISTILL_TINY = [
    *PAIRS_TINY[:11], "pairs.num_pairs=16", "pairs.num_steps=4", "pairs.pairs_per_shard=16", "distill.batch=8",
    "distill.reg_batch=8", "distill.checkpoint_nimg=64", "distill.log_nimg=16", "distill.lpips_size=32",
    "distill.val_every_nimg=0", "distill.keep=last", "encode.num_images=320", "probe.epochs=15", "probe.batch=32",
]
VALIDATION = ["distill.val_every_nimg=32", "distill.val_images=24", "distill.val_batch=8", "distill.keep=best"]
DMD2 = ["distill.method=dmd2", "distill.lambda_reg=0", "pairs.num_pairs=0", "distill.fake_updates_per_gen=2"]


def on_node(fn, delay_s, item):
    """A Ray task's work, after `delay_s`, with the node it ran on."""
    import time

    import ray

    time.sleep(delay_s)
    return ray.get_runtime_context().get_node_id(), fn(item)


class NodeRecordingExecutor(RayExecutor):
    """A RayExecutor that records the node each task finished on; `delay_s` before each task's work
    (so that a node removed meanwhile finds its tasks running)."""

    def __init__(self, delay_s: float = 0.0) -> None:
        super().__init__()
        self.delay_s, self.nodes = delay_s, []

    def map(self, fn, items, resources, desc=""):
        results = super().map(partial(on_node, fn, self.delay_s), items, resources, desc)
        self.nodes += [node for node, _ in results]
        return [result for _, result in results]


# (extension, PIL format, mode) cycled over the files of a class folder.
_FORMATS = (
    (".jpg", "JPEG", "RGB"),
    (".png", "PNG", "L"),
    (".png", "PNG", "RGBA"),
    (".jpeg", "JPEG", "CMYK"),
    (".webp", "WEBP", "RGB"),
    (".JPG", "JPEG", "L"),
    (".png", "PNG", "P"),
)


def image_bytes(seed: int, size: tuple[int, int], fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    """A deterministic smooth random image (width, height) encoded as `fmt` in `mode`."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)
    if mode == "RGBA":
        img.putalpha(Image.linear_gradient("L").resize(size))
    else:
        img = img.convert(mode)
    out = io.BytesIO()
    img.save(out, format=fmt)
    return out.getvalue()


def make_image_folder(root: Path, classes: dict[str, int], size: tuple[int, int] = (40, 30),
                      corrupt: list[str] = ()) -> Path:
    """`root/<class>/...` with `n` images per class in mixed formats and modes (every third
    one in a sub-folder), a non-image file, and `corrupt` (relative paths) as a garbage file
    ('.png') or a truncated JPEG (other extensions)."""
    for c, (name, count) in enumerate(sorted(classes.items())):
        for i in range(count):
            ext, fmt, mode = _FORMATS[i % len(_FORMATS)]
            sub = "sub/" if i % 3 == 2 else ""
            path = root / name / f"{sub}img{i:03d}{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(image_bytes(100 * c + i, size, fmt, mode))
        (root / name / "notes.txt").write_text("not an image")
    for rel in corrupt:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        good = image_bytes(0, size)
        path.write_bytes(b"\x89PNG garbage" * 8 if rel.endswith(".png") else good[: len(good) // 2])
    return root


def make_imagenet(root: Path, synsets: list[str], per_class: int, as_tars: bool) -> Path:
    """ILSVRC2012 train layout: `root/<synset>/<synset>_<i>.JPEG`, or `root/<synset>.tar`."""
    root.mkdir(parents=True, exist_ok=True)
    for c, synset in enumerate(synsets):
        files = {f"{synset}_{i}.JPEG": image_bytes(1000 * c + i, (50 + 7 * i, 40))
                 for i in range(per_class)}
        if as_tars:
            with tarfile.open(root / f"{synset}.tar", "w") as tar:
                for name, data in files.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        else:
            (root / synset).mkdir()
            for name, data in files.items():
                (root / synset / name).write_bytes(data)
    return root


def save_tiny_vae(path: Path) -> str:
    """A random two-block AutoencoderKL (downsamples by 2, 4 latent channels), saved offline."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64), latent_channels=4, layers_per_block=1, norm_num_groups=32,
        sample_size=32,
    )
    vae.save_pretrained(path)
    return str(path)


def save_tiny_decoder(path: Path) -> str:
    """A random AutoencoderTiny (TAESD's architecture, 4 latent channels) that upsamples by 2, saved
    offline; its scaling_factor is 0.5 (TAESD's is 1) so that a test can tell where it goes."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                    num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), scaling_factor=0.5).save_pretrained(path)
    return str(path)


def save_random_inception(path: Path) -> str:
    """A tiny random network saved as TorchScript with the calling convention of clean-fid's
    inception-2015-12-05.pt: `.layers` maps (img - 128) / 128 at 299x299 to [B, 2048, 1, 1] pool
    features; `forward(img, return_features=True)` resizes inside and gives [B, 2048]."""
    import torch
    import torch.nn.functional as F

    class TinyInception(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.Sequential(
                torch.nn.Conv2d(3, 8, 5, stride=4), torch.nn.ReLU(),
                torch.nn.Conv2d(8, 32, 3, stride=2), torch.nn.ReLU(),
                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Conv2d(32, 2048, 1), torch.nn.ReLU(),
            )
            self.output = torch.nn.Linear(2048, 1008)  # the real file's 1008 logits

        def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            x = F.interpolate(img, size=(299, 299), mode="bilinear", align_corners=False)
            features = self.layers((x - 128) / 128).flatten(1)
            return features if return_features else self.output(features)

    torch.manual_seed(0)
    torch.jit.script(TinyInception().eval()).save(str(path))
    return str(path)


@contextlib.contextmanager
def ray_cluster(head: dict, *workers: dict):
    """A simulated multi-node Ray cluster (ray.cluster_utils) in place of the session's instance, which is
    started again afterwards for the tests that follow."""
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.executor import init_ray

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={**head, "include_dashboard": False})
    for worker in workers:
        cluster.add_node(**worker)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        init_ray()


class CountingExecutor(InlineExecutor):
    """Inline, counting the tasks it runs (to assert that a cached rerun runs none)."""

    def __init__(self) -> None:
        self.calls = 0

    def map(self, fn, items, resources=Resources(), desc=""):
        self.calls += len(items)
        return super().map(fn, items, resources, desc)
