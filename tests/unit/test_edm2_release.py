"""EDM2's release pickles read without running them: a test-made file in the same format (persistence
records of a small random network, float16 tensors, a dnnlib EasyDict on top, numpy values), and
files that carry other globals, a nested storage that does, or are cut short."""

import io
import json
import os
import pickle
import numpy as np
import pytest
import torch

from pipeline import cli
from pipeline.models import edm2_release as R
from pipeline.models.edm2 import build_denoiser
from pipeline.weights import read_weights

from helpers import EDM2_KWARGS, EasyDict, Precond


def test_a_release_file_gives_the_networks_tensors_and_arguments(release_pickler, tmp_path, monkeypatch):
    torch.manual_seed(0)
    net = build_denoiser(preset="ci", img_resolution=8, img_channels=3, num_classes=2).half()
    data = release_pickler(EasyDict(ema=net, dataset_kwargs={"resolution": 8, "max_size": 10},
                                    encoder_scale=np.float32([0.5, 0.25]), step=np.int64(7)))
    monkeypatch.chdir(tmp_path)
    top = R.loads(data)
    assert not (tmp_path / "PWNED").exists()  # the record's source was never run
    assert isinstance(top, R.EasyDict) and top.dataset_kwargs == {"resolution": 8, "max_size": 10}
    assert isinstance(top.ema, R.Persistent) and top.ema.init_kwargs == {"kind": type(net).__name__}
    assert "os.system" in top.ema.module_src
    np.testing.assert_array_equal(top.encoder_scale, np.float32([0.5, 0.25]))
    assert top.step == 7 and isinstance(top.step, np.int64)
    assert any(isinstance(m, R.TorchModule) for m in top.ema.state["_modules"]["unet"].state["_modules"].values())
    expected = net.state_dict()
    got = R.tensors(top.ema)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name].dtype == torch.float16 and torch.equal(got[name], value), name
    rebuilt = build_denoiser(preset="ci", img_resolution=8, img_channels=3, num_classes=2)
    rebuilt.load_state_dict({k: v.float() for k, v in got.items()})
    x, sigma, labels = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 2.0]), torch.tensor([0, 1])
    torch.testing.assert_close(rebuilt(x, sigma, labels), net.float()(x, sigma, labels))


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
                                           (Unknown(), "refused tests.unit.test_edm2_release.Unknown|refused test_edm2_release.Unknown")])
def test_any_other_global_is_refused_without_running_it(payload, named, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = pickle.dumps({"ema": torch.zeros(2), "payload": payload}, protocol=4)
    with pytest.raises(R.UnsafePickleError, match=named):
        R.loads(data)
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

    with pytest.raises(R.UnsafePickleError, match="nested torch storage"):
        R.loads(pickle.dumps(TorchLoadFromBytes(), protocol=4))
    assert not (tmp_path / "PWNED").exists()
    ok = io.BytesIO()
    torch.save(torch.arange(3.0), ok)
    good = type("Good", (), {"__reduce__": lambda self: (__import__("torch.storage").storage._load_from_bytes, (ok.getvalue(),))})
    torch.testing.assert_close(R.loads(pickle.dumps(good(), protocol=4)), torch.arange(3.0))


def test_a_truncated_file_is_a_clear_error(release_pickler, tmp_path):
    data = release_pickler(EasyDict(ema=torch.nn.Linear(3, 2)))
    path = tmp_path / "edm2-img64-s-1073741-0.075.pkl"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"edm2-img64-s-1073741-0.075.pkl is not a complete EDM2 pickle.*download it again"):
        R.load(str(path))


def test_import_edm2_writes_the_network_the_stages_read(release_pickler, tmp_path, capsys):
    torch.manual_seed(0)
    net = build_denoiser("S", 16, 3, 10, channels=64, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8]).half()
    path = tmp_path / "edm2-img16-test-0.100.pkl"
    path.write_bytes(release_pickler(EasyDict(ema=Precond(net, **EDM2_KWARGS), dataset_kwargs={"resolution": 16})))
    out = tmp_path / "imported"
    assert cli.main(["import-edm2", str(path), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    config = json.loads((out / "network.json").read_text())
    assert config == {**net.config, "preset": "S"}
    imported = build_denoiser(**config)
    weights = read_weights(str(out / "network.safetensors"))
    assert all(w.dtype == torch.float32 for w in weights.values())
    imported.load_state_dict(weights)
    x, sigma, labels = torch.randn(3, 3, 16, 16), torch.tensor([0.1, 1.0, 20.0]), torch.tensor([0, 4, 9])
    expected, expected_u = net.float()(x, sigma, labels, return_u=True)
    got, got_u = imported(x, sigma, labels, return_u=True)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got_u, expected_u)  # EDM2's logvar head became onestep's u(sigma)


@pytest.mark.parametrize("change,named", [({"sigma_data": 1.0}, "sigma_data=1.0"),
                                          ({"concat_balance": 0.7}, "concat_balance=0.7"),
                                          ({"fancy_new_option": 1}, "fancy_new_option"),
                                          ({"model_channels": 96}, "do not fit")])
def test_networks_onestep_cannot_compute_are_refused(change, named, release_pickler, tmp_path, capsys):
    net = build_denoiser("S", 16, 3, 10, channels=64, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])
    path = tmp_path / "other.pkl"
    path.write_bytes(release_pickler(EasyDict(ema=Precond(net, **{**EDM2_KWARGS, **change}))))
    assert cli.main(["import-edm2", str(path), "--out", str(tmp_path / "out")]) == 2
    assert named in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_import_edm2_refuses_a_file_that_runs_code(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"ema": RunsCode()}))
    assert cli.main(["import-edm2", "evil.pkl", "--out", "out"]) == 2
    assert "refused" in capsys.readouterr().err and not (tmp_path / "PWNED").exists()
