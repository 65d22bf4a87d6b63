"""The GPUs' bf16 autocast paths, run on the CPU ($ONESTEP_CPU_BF16=1): dtype bugs show without a GPU."""

import math

import pytest
import torch

from pipeline import config as C
from pipeline import dag, store
from pipeline.diffusion.loss import edm2_loss
from pipeline.executor import InlineExecutor
from pipeline.models.edm2 import build_denoiser
from pipeline.training import CPU_BF16, mixed_precision


def test_bf16_on_the_cpu_where_it_has_amx_or_when_asked(monkeypatch):
    def product_dtype() -> torch.dtype:
        with mixed_precision(torch.device("cpu")):
            return (torch.ones(2, 2) @ torch.ones(2, 2)).dtype

    monkeypatch.delenv(CPU_BF16, raising=False)
    for amx, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        assert product_dtype() == dtype
    monkeypatch.setenv(CPU_BF16, "0")  # fp32 on an AMX CPU
    assert product_dtype() == torch.float32
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setenv(CPU_BF16, "1")  # bf16 without one
    assert product_dtype() == torch.bfloat16
    monkeypatch.setenv(CPU_BF16, "yes")
    with pytest.raises(ValueError, match="ONESTEP_CPU_BF16='yes'.*1.*0"):
        mixed_precision(torch.device("cpu"))


def test_bf16_loss_and_gradients_match_fp32_on_the_cpu(monkeypatch):
    torch.manual_seed(0)
    net = build_denoiser("ci", 16, 3, 10).train()
    y, labels = torch.randn(16, 3, 16, 16), torch.randint(10, (16,))
    sigma, noise = torch.rand(16) * 5 + 0.1, torch.randn(16, 3, 16, 16)
    grads = []
    for bf16 in ("0", "1"):
        monkeypatch.setenv(CPU_BF16, bf16)
        net.zero_grad()
        with mixed_precision(torch.device("cpu")):
            out = edm2_loss(net, y, labels, sigma, noise)
        out.loss.backward()
        assert out.loss.dtype == torch.float32  # losses are reduced in fp32 either way
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.99
    assert not torch.equal(grads[0], grads[1])  # bf16 did run


@pytest.mark.slow
def test_teacher_and_distill_train_in_bf16_on_the_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv(CPU_BF16, "1")
    cfg = C.load_config("ci", ["executor=inline", "teacher.duration_nimg=128", "teacher.snapshot_nimg=64",
                               "teacher.checkpoint_nimg=128", "teacher.log_nimg=64", "pairs.num_pairs=32",
                               "pairs.num_steps=4", "distill.duration_nimg=32", "distill.checkpoint_nimg=32",
                               "distill.log_nimg=16", "probe.enabled=false", "pairs.select=fixed", "distill.val_every_nimg=0", "distill.keep=last", "refstats.inception_weights=random"],
                        storage=str(tmp_path))
    dag.run(cfg, until="distill", executor=InlineExecutor())
    keys, st = dag.cache_keys(dag.graph(), cfg), store.Store(str(tmp_path))
    for stage in ("teacher", "distill"):
        metrics = st.artifact(stage, keys[stage]).manifest()["outputs"]["metrics"]
        losses = {k: v for k, v in metrics.items() if k.startswith("loss") and not isinstance(v, dict)}
        assert losses and all(math.isfinite(float(v)) for v in losses.values()), (stage, metrics)
