"""GPU paths: bf16 autocast, NCCL DDP and GPU map tasks. Skipped without a CUDA device."""

import pytest
import torch

from pipeline import cli, config as C, dag, store
from pipeline.diffusion.loss import edm2_loss
from pipeline.models.edm2 import build_denoiser

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GPU_SETTINGS = ["teacher.use_gpu=true", "distill.use_gpu=true", "encode.num_gpus=1", "refstats.num_gpus=1",
                "pairs.num_gpus=1", "eval.num_gpus=1"]


def test_bf16_loss_and_gradients_match_fp32():
    torch.manual_seed(0)
    net = build_denoiser("ci", 16, 3, 10).cuda().train()
    y = torch.randn(32, 3, 16, 16, device="cuda")
    labels = torch.randint(10, (32,), device="cuda")
    sigma, noise = torch.rand(32, device="cuda") * 5 + 0.1, torch.randn_like(y)
    grads = []
    for enabled in (False, True):
        net.zero_grad()
        with torch.autocast("cuda", torch.bfloat16, enabled=enabled):
            out = edm2_loss(net, y, labels, sigma, noise)
        out.loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
        if enabled:
            assert out.loss.dtype == torch.float32  # losses are reduced in fp32
    cosine = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert cosine > 0.99, float(cosine)


def test_ci_dag_on_the_gpu_with_nccl(ray_session, tmp_path):
    storage = str(tmp_path / "artifacts")
    sets = [arg for s in GPU_SETTINGS for arg in ("--set", s)]
    assert cli.main(["run", "--config", "ci", "--storage", storage, *sets]) == 0
    cfg = C.load_config("ci", GPU_SETTINGS, storage=storage)
    keys = dag.cache_keys(dag.graph(), cfg)
    st = store.Store(storage)
    for stage, key in keys.items():
        assert st.artifact(stage, key).state() == "done", stage
    for stage in ("teacher", "distill"):
        metrics = st.artifact(stage, keys[stage]).manifest()["outputs"]["metrics"]
        assert all(torch.isfinite(torch.tensor(float(v))) for k, v in metrics.items() if k.startswith("loss")), metrics
