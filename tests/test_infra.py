"""infra/, checked offline: the files parse and pass Ray's own checks, every job command in them
goes through the real CLI parser and config loader and fits the cluster it is written for, the
image pins agree with pyproject.toml, and no credential is written anywhere. Nothing is built,
pulled or uploaded; no storage is touched."""

import re
import shlex
import zipfile
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from pipeline import cli, dag
from pipeline.config import Config

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
CLUSTER = INFRA / "aws" / "cluster.yaml"
RAYJOB = INFRA / "k8s" / "rayjob.yaml"
RUNTIME_ENV = INFRA / "runtime_env.yaml"
DOCKERFILE = INFRA / "Dockerfile"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
CREDENTIAL_NAME = re.compile(r"SECRET|TOKEN|KEY|PASSWORD|CREDENTIAL", re.IGNORECASE)


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _rayjob_runtime_env() -> dict:
    return yaml.safe_load(_load(RAYJOB)["spec"]["runtimeEnvYAML"])


def _comment_commands(path: Path) -> list[list[str]]:
    """The shell commands a file shows in its comments (indented under the `#`, as code blocks are),
    continuation lines joined, split as a shell would."""
    commands, current = [], ""
    for line in path.read_text().splitlines():
        body = line.strip()[1:] if line.strip().startswith("#") else ""
        text = body.strip() if body.startswith("  ") else ""
        if text.endswith("\\"):
            current += text[:-1] + " "
            continue
        command, current = current + text, ""
        if re.match(r"(ray|onestep|kubectl|docker|python) ", command):
            commands.append(shlex.split(command, comments=True))
    return commands


def _job_args(command: list[str]) -> list[str]:
    """The arguments after `workflows/full.py` in a command line."""
    at = next(i for i, word in enumerate(command) if word.endswith("workflows/full.py"))
    return command[at + 1:]


def _job_commands() -> dict[str, list[str]]:
    """Where each `workflows/full.py` command line is -> its arguments."""
    jobs = {"rayjob.yaml entrypoint": _job_args(shlex.split(_load(RAYJOB)["spec"]["entrypoint"]))}
    for path in (CLUSTER, RUNTIME_ENV):
        commands = [c for c in _comment_commands(path) if "workflows/full.py" in c]
        jobs |= {f"{path.name} comment {i + 1}": _job_args(c) for i, c in enumerate(commands)}
    return jobs


def _config(args: list[str]) -> Config:
    """What `python workflows/full.py ARGS` would run: the real parser, the real config loader."""
    return cli.load(cli.parser().parse_args(["run", *args]))


# --- every file parses and passes Ray's own checks -------------------------------------------

@pytest.mark.parametrize("path", sorted(INFRA.rglob("*.yaml")), ids=lambda p: str(p.relative_to(INFRA)))
def test_every_yaml_parses_to_a_mapping(path):
    assert isinstance(_load(path), dict)


def test_cluster_yaml_passes_the_cluster_launchers_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(_load(CLUSTER)))  # what `ray up` runs first: schema, head type, docker


def test_cluster_node_types_autoscale_within_bounds_and_gpu_types_declare_gpus():
    cluster = _load(CLUSTER)
    types = cluster["available_node_types"]
    assert {"cluster_name", "max_workers", "provider", "auth", "available_node_types", "head_node_type"} <= set(cluster)
    assert cluster["provider"]["type"] == "aws" and cluster["provider"]["region"]
    assert cluster["head_node_type"] in types
    assert types[cluster["head_node_type"]]["resources"].get("GPU", 0) == 0
    workers = {name: t for name, t in types.items() if name != cluster["head_node_type"]}
    assert workers, "no worker node type"
    for name, t in workers.items():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cluster["max_workers"], name
        if t["node_config"]["InstanceType"].startswith(("g", "p")):  # EC2's GPU families
            assert t["resources"].get("GPU", 0) >= 1, f"{name} is a GPU instance but declares no GPU"
    assert sum(t["min_workers"] for t in workers.values()) <= cluster["max_workers"]
    assert any(t["resources"].get("GPU", 0) for t in workers.values())


def test_rayjob_is_a_kuberay_v1_rayjob_with_an_autoscaling_gpu_group():
    job = _load(RAYJOB)
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    groups = spec["rayClusterSpec"]["workerGroupSpecs"]
    gpu_groups = [g for g in groups if _pod_resources(g)["GPU"] >= 1]
    assert gpu_groups, "no worker group requests nvidia.com/gpu"
    for g in groups:
        assert g["groupName"] and g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        for c in g["template"]["spec"]["containers"]:
            assert c["resources"]["limits"].get("nvidia.com/gpu") == c["resources"]["requests"].get("nvidia.com/gpu")


# --- every job command is one the real CLI accepts and the cluster can start -----------------

@pytest.mark.parametrize("where", _job_commands())
def test_job_commands_load_through_the_real_cli_and_config(where):
    cfg = _config(_job_commands()[where])  # an unknown preset or --set key raises here
    dag.check_executor_storage(cfg.executor, cfg.storage)
    dag.check_cluster_storage(2, cfg.storage, cfg.shared_storage)  # what a multi-node cluster refuses


def test_the_job_commands_are_found():
    assert set(_job_commands()) == {"rayjob.yaml entrypoint", "cluster.yaml comment 1",
                                    "runtime_env.yaml comment 1", "runtime_env.yaml comment 2"}


def _cpus(quantity) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _pod_resources(group: dict) -> dict[str, float]:
    """What `ray start` advertises for one KubeRay pod: rayStartParams, else the container's limits."""
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    params = group.get("rayStartParams") or {}
    return {"CPU": _cpus(params.get("num-cpus", limits.get("cpu", 0))),
            "GPU": float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))}


def _rayjob_nodes() -> list[dict[str, float]]:
    """The head pod and each GPU group's minReplicas pods: what is up when the job starts."""
    cluster = _load(RAYJOB)["spec"]["rayClusterSpec"]
    return [_pod_resources(cluster["headGroupSpec"])] + [
        _pod_resources(g) for g in cluster["workerGroupSpecs"] for _ in range(g["minReplicas"])]


def _cluster_yaml_nodes() -> list[dict[str, float]]:
    cluster = _load(CLUSTER)
    types = cluster["available_node_types"]
    nodes = [{k: float(v) for k, v in types[cluster["head_node_type"]]["resources"].items()}]
    for name, t in types.items():
        if name != cluster["head_node_type"]:
            nodes += [{k: float(v) for k, v in t["resources"].items()}] * t.get("min_workers", 0)
    return nodes


@pytest.mark.parametrize("where, nodes", [("rayjob.yaml entrypoint", _rayjob_nodes),
                                           ("cluster.yaml comment 1", _cluster_yaml_nodes)],
                         ids=["rayjob", "cluster.yaml"])
def test_job_fits_the_nodes_up_when_it_starts(where, nodes, monkeypatch):
    """onestep checks every stage against the live nodes before the first starts, when an autoscaling
    cluster has only its minimum: the real checks, on those nodes."""
    from pipeline import executor

    up = nodes()
    monkeypatch.setattr(executor, "_node_resources", lambda: [dict(n) for n in up])
    ray_executor = executor.RayExecutor.__new__(executor.RayExecutor)  # the checks only: no ray.init
    dag.check_resources(ray_executor, list(dag.graph().values()), _config(_job_commands()[where]))


def test_submit_commands_use_one_runtime_env_and_the_cli_builds_it():
    submits = [c for path in (CLUSTER, RUNTIME_ENV) for c in _comment_commands(path)
               if c[:3] == ["ray", "job", "submit"]]
    for command in submits:
        assert not {"--runtime-env", "--runtime-env-json"} <= set(command), "ray refuses both at once"
        if "--runtime-env" in command:
            assert (REPO / command[command.index("--runtime-env") + 1]).is_file()
    built = [inner for c in submits for inner in re.findall(r"\$\((onestep [^)]*)\)", " ".join(c))]
    assert built, "no example passes credentials at submit time"
    for inner in built:
        args = cli.parser().parse_args(shlex.split(inner)[1:])  # `onestep runtime-env --env ...`
        assert args.command == "runtime-env" and Path(args.file) == RUNTIME_ENV.relative_to(REPO)


# --- the runtime env ---------------------------------------------------------------------------

def test_runtime_env_is_valid_for_ray_job_submit():
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
    from ray.runtime_env import RuntimeEnv

    env = parse_runtime_env_args(runtime_env=str(RUNTIME_ENV))  # what `--runtime-env FILE` reads
    assert set(env) <= RuntimeEnv.known_fields, "an unknown field would be taken for a plugin and fail on the cluster"
    RuntimeEnv(**env)  # Ray's type checks (env_vars: str -> str, excludes: a list)
    assert env["working_dir"] == "."
    assert "pip" not in env and "conda" not in env and "uv" not in env, "dependencies are in the image"


def test_runtime_env_uploads_the_code_and_not_git_venvs_or_artifacts(tmp_path):
    """Ray's own packer on a tree shaped like a checkout, with only these excludes (no .gitignore)."""
    from ray._private.runtime_env.packaging import _zip_files

    code = [p.relative_to(REPO) for d in ("pipeline", "stages", "workflows") for p in (REPO / d).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts]
    code += [Path("pyproject.toml"), Path("infra/runtime_env.yaml")]
    junk = [".git/HEAD", ".venv/bin/python", "venv/bin/python", "artifacts/encode/0123abcd/manifest.json",
            "pipeline/__pycache__/cli.cpython-311.pyc", "onestep.egg-info/PKG-INFO", ".pytest_cache/README.md"]
    for rel in [*code, *map(Path, junk)]:
        (tmp_path / "tree" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "tree" / rel).write_text("x")
    package = tmp_path / "package.zip"
    _zip_files(str(tmp_path / "tree"), _load(RUNTIME_ENV)["excludes"], str(package), include_gitignore=False)
    shipped = {Path(n) for n in zipfile.ZipFile(package).namelist() if not n.endswith("/")}
    assert set(code) <= shipped, sorted(map(str, set(code) - shipped))
    assert not shipped & set(map(Path, junk)), sorted(map(str, shipped & set(map(Path, junk))))


def test_env_vars_hold_no_credentials_and_agree_between_submit_and_rayjob():
    env_vars = _load(RUNTIME_ENV)["env_vars"]
    assert not [k for k in env_vars if CREDENTIAL_NAME.search(k)]
    assert _rayjob_runtime_env()["env_vars"] == env_vars


def test_cluster_syncs_only_code_folders_to_the_images_code_folder():
    """`ray up` reads every byte of its file_mounts: `.` would mean .venv and artifacts/ each time."""
    [workdir] = [l.split()[1] for l in _dockerfile() if l.startswith("WORKDIR")]
    for target, source in _load(CLUSTER)["file_mounts"].items():
        assert Path(source).parent == Path(".") and Path(source).name in {"pipeline", "stages", "workflows"}, source
        assert (REPO / source).is_dir() and target == f"{workdir}/{Path(source)}", (target, source)


# --- the image ---------------------------------------------------------------------------------

def _dockerfile() -> list[str]:
    """Instructions, continuation lines joined, comments dropped."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [l.strip() for l in text.splitlines() if l.strip()]


def _pins() -> dict[str, Requirement]:
    pins = {}
    for line in _dockerfile():
        if line.startswith("RUN") and "pip install" in line:
            for word in shlex.split(line):
                if "==" in word:
                    req = Requirement(word)
                    pins[req.name] = req
    return pins


def test_dockerfile_base_image_is_pinned_and_matches_the_torch_cuda_build():
    [base] = [l.split()[1] for l in _dockerfile() if l.startswith("FROM")]
    name, _, tag = base.partition(":")
    assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag), base
    index = re.search(r"download\.pytorch\.org/whl/cu(\d+)", DOCKERFILE.read_text()).group(1)
    cuda = re.match(r"(\d+)\.(\d+)", tag)
    assert name == "nvidia/cuda" and index == cuda.group(1) + cuda.group(2), (base, index)


def test_dockerfile_pins_torch_torchvision_ray_within_pyproject_ranges():
    pins = _pins()
    declared = {Requirement(d).name: Requirement(d) for d in PYPROJECT["project"]["dependencies"]}
    for name in ("torch", "torchvision", "ray"):
        [spec] = pins[name].specifier
        assert spec.operator == "==", f"{name} is not pinned"
        assert declared[name].specifier.contains(spec.version), f"{name}=={spec.version} vs {declared[name]}"
    assert pins["ray"].extras >= declared["ray"].extras
    torch, vision = (Version(next(iter(pins[n].specifier)).version) for n in ("torch", "torchvision"))
    assert vision.minor == torch.minor + 15, "torchvision 0.N+15 is built for torch 2.N"
    python = re.search(r"python(3\.\d+)-venv", DOCKERFILE.read_text()).group(1)
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(python + ".0")


def test_images_versions_and_paths_agree_across_files():
    job = _load(RAYJOB)["spec"]["rayClusterSpec"]
    pods = [job["headGroupSpec"], *job["workerGroupSpecs"]]
    images = {c["image"] for p in pods for c in p["template"]["spec"]["containers"]}
    images.add(_load(CLUSTER)["docker"]["image"])
    version = PYPROJECT["project"]["version"]
    [image] = images  # one image everywhere: the Dockerfile's, as tagged below, in any registry
    assert re.fullmatch(rf"([^\s:]+/)?onestep:{re.escape(version)}", image), image
    assert f"-t onestep:{version} " in DOCKERFILE.read_text()
    assert job["rayVersion"] == next(iter(_pins()["ray"].specifier)).version
    [workdir] = [l.split()[1] for l in _dockerfile() if l.startswith("WORKDIR")]
    assert _rayjob_runtime_env()["working_dir"] == workdir


# --- no credentials ----------------------------------------------------------------------------

def test_rayjob_pods_get_credentials_from_a_service_account_or_secret_only():
    cluster = _load(RAYJOB)["spec"]["rayClusterSpec"]
    for pod in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        spec = pod["template"]["spec"]
        assert spec.get("serviceAccountName")
        for c in spec["containers"]:
            assert all("secretRef" in e for e in c.get("envFrom", []))
            literal = [e["name"] for e in c.get("env", []) if "value" in e and CREDENTIAL_NAME.search(e["name"])]
            assert not literal, f"{c['name']}: {literal} written as literal values"


SECRET_PATTERNS = {
    "AWS access key id": r"\b(AKIA|ASIA)[0-9A-Z]{16}\b",
    "AWS secret key assignment": r"(?i)aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+]{40}",
    "private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    "GitHub token": r"\bgh[pousr]_[A-Za-z0-9]{36}\b",
    "GCP service account key": r"\"private_key_id\"\s*:",
}


@pytest.mark.parametrize("path", sorted(p for p in INFRA.rglob("*") if p.is_file()),
                         ids=lambda p: str(p.relative_to(INFRA)))
def test_no_file_in_infra_holds_a_literal_secret(path):
    text = path.read_text()
    found = [what for what, pattern in SECRET_PATTERNS.items() if re.search(pattern, text)]
    assert not found, found
