"""EDM2's own files read without running them: snapshots and post-hoc reconstructions with EDM2's module tree,
names, float16 tensors and persistence records (tests/edm2_files.py), imported into onestep's network with the
same forward; files that carry other globals, a nested storage that does, or are cut short."""

import io
import json
import os
import pickle
import re

import numpy as np
import pytest
import torch

import edm2_files as E
from pipeline import cli
from pipeline.data.encoders import RAW_MEAN, RAW_STD
from pipeline.models import edm2_import as R
from pipeline.models import unpickle as U
from pipeline.models.edm2 import build_denoiser
from pipeline.weights import read_weights

PAYLOAD = "import os\nos.system('touch PWNED')\n"


@pytest.mark.parametrize("protocol", [4, 5])  # Python's default protocol: 4 up to 3.13, 5 from 3.14
def test_an_edm2_snapshot_reads_as_records_without_running_its_code(protocol, tmp_path, monkeypatch):
    net = E.precond(0)
    data = E.snapshot(net, loss_fn=E.EDM2Loss(P_mean=-0.8, P_std=1.6))
    monkeypatch.chdir(tmp_path)
    top = U.loads(E.dumps(data, protocol, module_src=PAYLOAD))
    assert not (tmp_path / "PWNED").exists()  # the records' source was never run
    assert isinstance(top, U.EasyDict) and sorted(top) == ["dataset_kwargs", "ema", "encoder", "loss_fn"]
    assert top.dataset_kwargs == {"class_name": "training.dataset.ImageFolderDataset", "path": "datasets/img16.zip",
                                  "use_labels": True}
    assert (top.encoder.class_name, top.encoder.state) == ("StandardRGBEncoder", {"_init_args": (), "_init_kwargs": {}})
    assert top.loss_fn.class_name == "EDM2Loss" and top.loss_fn.init_kwargs == {"P_mean": -0.8, "P_std": 1.6}
    assert top.ema.class_name == "Precond" and top.ema.module_src == PAYLOAD and top.ema.init_args == ()
    assert top.ema.init_kwargs == {"img_resolution": 16, "img_channels": 3, "label_dim": 10, "use_fp16": True, **E.TINY}
    assert isinstance(top.ema.state["_modules"]["unet"].state["_modules"]["enc"], U.TorchModule)  # a ModuleDict
    got, expected = U.tensors(top.ema), data["ema"].state_dict()
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name].dtype == torch.float16 and torch.equal(got[name], value), name


def test_every_edm2_tensor_lands_in_onesteps_network_and_every_onestep_tensor_comes_from_the_file():
    record = U.loads(E.dumps(E.snapshot(E.precond(0))))["ema"]
    theirs = U.tensors(record)
    assert {"unet.emb_fourier.freqs", "unet.emb_fourier.phases", "logvar_fourier.freqs", "logvar_fourier.phases",
            "logvar_linear.weight", "unet.out_gain", "unet.emb_label.weight", "unet.enc.16x16_conv.weight",
            "unet.enc.8x8_down.emb_gain", "unet.dec.8x8_in0.attn_qkv.weight", "unet.dec.16x16_block1.conv_skip.weight",
            "unet.out_conv.weight"} <= set(theirs)  # EDM2's own names
    ours = build_denoiser(**R.network_arguments(record)).state_dict()
    mapping = {name: R.onestep_name(name) for name in theirs}
    assert sorted(mapping.values()) == sorted(ours)  # every onestep tensor, each from one EDM2 tensor
    assert all(theirs[name].shape == ours[mapping[name]].shape for name in theirs)
    assert (mapping["unet.emb_fourier.freqs"], mapping["logvar_fourier.phases"]) == ("unet.emb_fourier.freq", "u_fourier.phase")
    state = R.network_state(record)
    assert all(state[mapping[name]].dtype == torch.float32 and torch.equal(state[mapping[name]], theirs[name].float())
               for name in theirs)


@pytest.mark.parametrize("label_dim", [10, 0])
def test_import_edm2_gives_the_network_edm2_computes(label_dim, tmp_path, capsys):
    data = E.snapshot(E.precond(1, label_dim=label_dim))
    path = E.write(tmp_path / "edm2-img16-s-2147483-0.130.pkl", data)
    out = tmp_path / "imported"
    assert cli.main(["import-edm2", str(path), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    config = json.loads((out / "network.json").read_text())
    assert config == {"preset": "S", "img_resolution": 16, "img_channels": 3, "num_classes": label_dim, "channels": 32,
                      "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [8], "dropout": 0.0}
    imported = build_denoiser(**config).eval()  # (training mode renormalises weights in place)
    weights = read_weights(str(out / "network.safetensors"))
    assert all(w.dtype == torch.float32 for w in weights.values())
    imported.load_state_dict(weights)
    reference = data["ema"].float()  # EDM2's math on the float32 of the file's float16 weights
    x, sigma, labels = torch.randn(3, 3, 16, 16), torch.tensor([0.1, 1.0, 20.0]), torch.tensor([0, 4, 9])
    cases = [(None, None)] + ([(labels, E.one_hot(labels, label_dim))] if label_dim else [])  # no labels: zeros
    with torch.no_grad():
        for ours, theirs in cases:
            expected, logvar = reference(x, sigma, theirs, return_logvar=True)
            got, u = imported(x, sigma, ours, return_u=True)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(u, logvar.reshape(-1), atol=1e-5, rtol=1e-5)  # EDM2's logvar is onestep's u


def _set_init_kwarg(net: E.Precond, **kwargs) -> E.Precond:
    net._init_kwargs.update(kwargs)  # a file written by another version of EDM2's code
    return net


@pytest.mark.parametrize("make,named", [
    (lambda: E.precond(0, sigma_data=1.0), "sigma_data=1.0"),
    (lambda: E.precond(0, concat_balance=0.7), "concat_balance=0.7"),
    (lambda: E.precond(0, channels_per_head=32), "channels_per_head=32"),
    (lambda: E.precond(0, model_channels=16), r"attention at \[32\] channels, where EDM2 computes none"),
    (lambda: _set_init_kwarg(E.precond(0), fancy_new_option=1), "fancy_new_option"),
    (lambda: _set_init_kwarg(E.precond(0), model_channels=64), "do not fit")])
def test_networks_onestep_cannot_compute_are_refused(make, named, tmp_path, capsys):
    path = E.write(tmp_path / "other.pkl", E.snapshot(make()))
    assert cli.main(["import-edm2", str(path), "--out", str(tmp_path / "out")]) == 2
    assert re.search(named, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


ENCODE_VAE = {"name": "vae", "raw_mean": list(RAW_MEAN), "raw_std": list(RAW_STD), "vae": "/models/sd-vae-ft-mse"}


@pytest.mark.parametrize("encoder,named", [
    (E.StabilityVAEEncoder(), None),
    (E.StabilityVAEEncoder(raw_mean=[5.81, 3.25, 0.12, -2.0]), "normalises VAE latents as raw"),
    (E.StabilityVAEEncoder(final_std=1.0), "normalises VAE latents as raw"),
    (E.StabilityVAEEncoder(vae_name="stabilityai/sd-vae-ft-ema"), "trained on latents of the VAE stabilityai/sd-vae-ft-ema"),
    (E.StandardRGBEncoder(), "trained on StandardRGBEncoder data")])
def test_the_encoder_record_is_checked_against_the_encode_artifact(encoder, named):
    top = U.loads(E.dumps(E.snapshot(E.precond(0, img_channels=4), encoder=encoder)))
    if named is None:
        R.check_encoder(top, ENCODE_VAE, "x.pkl")
    else:
        with pytest.raises(ValueError, match=named):
            R.check_encoder(top, ENCODE_VAE, "x.pkl")


def test_file_names_give_edm2s_times():
    assert [R.kimg_to_nimg(k) for k in (0, 1, 8388, 2147483, 41, 42)] == [0, 1024, 8388608, 2147483648, 41984, 42000]


class RunsCode:
    def __reduce__(self):
        return os.system, ("touch PWNED",)


class Evaluates:
    def __reduce__(self):
        return eval, ("open('PWNED', 'w')",)


class Unknown:
    pass


@pytest.mark.parametrize("payload,named", [(RunsCode(), "refused posix.system|refused os.system"),
                                           (Evaluates(), "refused builtins.eval"),
                                           (Unknown(), "refused tests.unit.test_edm2_import.Unknown|refused test_edm2_import.Unknown")])
def test_any_other_global_is_refused_without_running_it(payload, named, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = pickle.dumps({"ema": torch.zeros(2), "payload": payload}, protocol=4)
    with pytest.raises(U.UnsafePickleError, match=named):
        U.loads(data)
    assert not (tmp_path / "PWNED").exists()


def test_a_nested_storage_is_read_restricted_too(tmp_path, monkeypatch):
    """A pickled storage is rebuilt from inner torch.save bytes: those are unpickled with torch's
    weights-only loader, so a payload hidden in them is refused as well."""
    monkeypatch.chdir(tmp_path)
    inner = io.BytesIO()
    torch.save({"w": torch.ones(2), "payload": RunsCode()}, inner)

    class TorchLoadFromBytes:  # pickled by reference as torch.storage._load_from_bytes
        def __reduce__(self):
            import torch.storage
            return torch.storage._load_from_bytes, (inner.getvalue(),)

    with pytest.raises(U.UnsafePickleError, match="nested torch storage"):
        U.loads(pickle.dumps(TorchLoadFromBytes(), protocol=4))
    assert not (tmp_path / "PWNED").exists()
    ok = io.BytesIO()
    torch.save(torch.arange(3.0), ok)
    good = type("Good", (), {"__reduce__": lambda self: (__import__("torch.storage").storage._load_from_bytes, (ok.getvalue(),))})
    torch.testing.assert_close(U.loads(pickle.dumps(good(), protocol=4)), torch.arange(3.0))


def test_a_truncated_file_is_a_clear_error(tmp_path):
    data = E.dumps(E.snapshot(E.precond(0)))
    path = tmp_path / "edm2-img64-s-1073741-0.075.pkl"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"edm2-img64-s-1073741-0.075.pkl is not a complete EDM2 pickle.*download it again"):
        U.load(str(path))


def test_import_edm2_refuses_a_file_that_runs_code(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"ema": RunsCode()}))
    assert cli.main(["import-edm2", "evil.pkl", "--out", "out"]) == 2
    assert "refused" in capsys.readouterr().err and not (tmp_path / "PWNED").exists()
