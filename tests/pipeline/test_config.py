import pytest

from pipeline import config as C
from pipeline import dag


def test_presets_load_and_ci_inherits_demo():
    demo = C.load_config("demo")
    ci = C.load_config("ci")
    assert demo.preset == "demo" and ci.preset == "ci"
    assert ci.encode.num_images == 600 and demo.encode.num_images > ci.encode.num_images  # ci overrides demo
    assert ci.encode.num_classes == demo.encode.num_classes  # inherited through `base: demo`
    assert {"demo", "ci"} <= set(C.preset_names())


def test_overrides_are_typed():
    cfg = C.load_config("ci", ["encode.resolution=64", "encode.max_corrupt_fraction=0", "seed=3"])
    assert cfg.encode.resolution == 64 and cfg.seed == 3
    assert isinstance(cfg.encode.max_corrupt_fraction, float)  # int widened to the field's float
    with pytest.raises(ValueError, match=r"encode.resolution: expected int, got 'abc'"):
        C.load_config("ci", ["encode.resolution=abc"])
    with pytest.raises(ValueError, match="expected int"):
        C.load_config("ci", ["encode.resolution=true"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        C.load_config("ci", ["encode.resolution"])


def test_unknown_keys_list_the_valid_ones():
    with pytest.raises(ValueError) as e:
        C.load_config("ci", ["encode.resolutoin=64"])
    assert "encode.resolutoin" in str(e.value) and "resolution" in str(e.value) and "shard_size" in str(e.value)
    with pytest.raises(ValueError, match="valid keys: distill, encode, estimate, eval, executor"):
        C.load_config("ci", ["nope=1"])


def test_values_are_validated():
    with pytest.raises(ValueError, match="encode.source = 'webcam': expected one of synthetic, digits, imagefolder, imagenet"):
        C.load_config("ci", ["encode.source=webcam"])
    with pytest.raises(ValueError, match="needs encode.path"):
        C.load_config("ci", ["encode.source=imagefolder"])
    with pytest.raises(ValueError, match="executor"):
        C.load_config("ci", ["executor=slurm"])
    with pytest.raises(ValueError, match="lpips_weights is set but distill.lpips_pretrained = false"):
        C.load_config("ci", ["distill.lpips_weights=/w/alexnet.pth"])  # ci: a random backbone
    assert C.load_config("ci", ["encode.source=digits"]).encode.path == ""  # shipped with scikit-learn


@pytest.mark.parametrize("settings,message", [
    (["distill.val_every_nimg=48"], r"val_every_nimg = 48 must be a multiple of distill.log_nimg = 32"),
    (["distill.val_every_nimg=0"], r"keep=best chooses the student from validations.*or distill.keep=last"),
    (["distill.keep=first"], r"distill.keep = 'first': expected one of best, last"),
    (["distill.early_stop_ratio=0.9"], r"early_stop_ratio = 0.9: must be > 1"),
    (["distill.val_images=0"], r"distill.val_images = 0: must be > 0"),
    (["probe.enabled=false"], r"probe.enabled = false, but distill validation \(off: distill.val_every_nimg=0 "
                              r"distill.keep=last\) and pairs.select=best \(off: pairs.select=fixed"),
    (["probe.enabled=false", "distill.val_every_nimg=0", "distill.keep=last"], r"but pairs.select=best .* needs the probe: turn it off"),
    (["pairs.select=worst"], r"pairs.select = 'worst': expected one of fixed, best"),
    (["pairs.select_images=0"], r"pairs.select_images = 0: must be > 0"),
    (["distill.gan_head=neck"], r"distill.gan_head = 'neck': expected one of bottleneck, encoder"),
])
def test_validation_settings_are_checked(settings, message):
    with pytest.raises(ValueError, match=message):
        C.load_config("ci", settings)


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'nope'.*ci"):
        C.load_config("nope")
    with pytest.raises(ValueError, match="does not exist"):
        C.load_config(str(tmp_path / "missing.yaml"))


def test_yaml_file_with_base_and_storage_override(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("base: ci\nencode:\n  num_images: 50\n")
    cfg = C.load_config(str(path), storage="memory://x")
    assert cfg.preset == "mine" and cfg.encode.num_images == 50 and cfg.encode.resolution == 16
    assert cfg.storage == "memory://x"


def test_result_fields_leave_out_throughput():
    cfg = C.load_config("ci")
    fields = C.result_fields(cfg.encode)
    assert "resolution" in fields and "batch" not in fields and "num_tasks" not in fields




def test_dump_round_trips(tmp_path):
    cfg = C.load_config("ci", ["encode.num_images=77"])
    path = tmp_path / "dumped.yaml"
    path.write_text(C.dump(cfg))
    assert C.load_config(str(path)) == cfg


def test_float_fields_take_exponents_without_a_dot():
    assert C.load_config("ci", ["teacher.lr=1e-3"]).teacher.lr == 0.001
    with pytest.raises(ValueError, match="teacher.lr: expected float"):
        C.load_config("ci", ["teacher.lr=fast"])


def test_the_dmd2_preset_is_the_demo_with_dmd2_and_shares_its_teacher():
    demo, dmd2 = C.load_config("demo", storage="/tmp/x"), C.load_config("dmd2", storage="/tmp/x")
    assert (dmd2.distill.method, dmd2.distill.lambda_reg, dmd2.pairs.num_pairs) == ("dmd2", 0, 0)
    assert dmd2.distill.duration_nimg == demo.distill.duration_nimg and dmd2.eval == demo.eval
    shared = ("adam_beta1", "lr_rampup_nimg", "val_every_nimg", "keep")  # one recipe for both students (but sigma_init)
    assert [getattr(dmd2.distill, f) for f in shared] == [getattr(demo.distill, f) for f in shared]
    demo_keys, dmd2_keys = dag.cache_keys(dag.graph(), demo), dag.cache_keys(dag.graph(), dmd2)
    same = {stage for stage in demo_keys if demo_keys[stage] == dmd2_keys[stage]}
    assert same == {"encode", "probe", "refstats", "teacher", "phema"}  # one storage holds both students
