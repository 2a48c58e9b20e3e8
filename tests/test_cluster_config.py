"""Offline checks of the deployment files: cluster.yaml (Ray cluster launcher),
k8s/rayjob.yaml (KubeRay RayJob), k8s/Dockerfile and .rayignore.

cluster.yaml is validated the way `ray up` validates it, with the JSON schema shipped in the
installed Ray wheel (ray/autoscaler/ray-schema.json) and Ray's own prepare/validate steps;
nothing here needs a network or a cloud account.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
RAYJOB_YAML = ROOT / "k8s" / "rayjob.yaml"
DOCKERFILE = ROOT / "k8s" / "Dockerfile"
RAYIGNORE = ROOT / ".rayignore"
VOC_CONFIG = ROOT / "configs" / "voc.yaml"


def _load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def cluster() -> dict:
    return _load(CLUSTER_YAML)


@pytest.fixture(scope="module")
def prepared(cluster) -> dict:
    """cluster.yaml merged with Ray's AWS defaults, as `ray up` sees it."""
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(json.loads(json.dumps(cluster)))


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return _load(RAYJOB_YAML)


def _gpu_worker_types(config: dict) -> dict:
    return {name: t for name, t in config["available_node_types"].items()
            if name != config["head_node_type"] and t["resources"].get("GPU", 0) >= 1}


def _pyproject_pins() -> dict[str, str]:
    text = (ROOT / "pyproject.toml").read_text()
    return dict(re.findall(r'"(torch|torchvision)==([0-9.]+)"', text))


# -- cluster.yaml ----------------------------------------------------------------------
def test_cluster_yaml_valid_against_ray_schema(cluster, prepared):
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import validate_config

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    jsonschema.validate(cluster, schema)  # the file as written
    validate_config(prepared)  # after Ray fills in defaults (what `ray up` checks)
    assert cluster["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_gpu_worker_autoscales_from_zero(cluster):
    gpu_types = _gpu_worker_types(cluster)
    assert len(gpu_types) == 1, f"expected one GPU worker type, got {sorted(gpu_types)}"
    (worker,) = gpu_types.values()
    assert worker["min_workers"] == 0
    assert 1 <= worker["max_workers"] <= cluster["max_workers"]
    assert worker["resources"]["GPU"] == 1 and worker["resources"]["CPU"] >= 1
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head node type should be CPU only"
    for t in cluster["available_node_types"].values():
        assert "IamInstanceProfile" in t["node_config"], "nodes get S3 access by role"


def test_token_auth_on_and_dashboard_on_loopback(prepared):
    head_cmds = " ".join(prepared["head_start_ray_commands"])
    worker_cmds = " ".join(prepared["worker_start_ray_commands"])
    assert "ray start --head" in head_cmds
    host = re.search(r"--dashboard-host[= ](\S+)", head_cmds)
    assert host and host.group(1) in ("127.0.0.1", "localhost"), head_cmds
    assert "0.0.0.0" not in json.dumps(prepared)
    for cmds in (head_cmds, worker_cmds):
        assert "RAY_AUTH_MODE=token ray start" in cmds
    assert "--env RAY_AUTH_MODE=token" in prepared["docker"]["run_options"]
    # Every node shares the token generated on the laptop.
    assert prepared["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_setup_installs_pinned_torch_and_the_project(cluster, prepared):
    pins = _pyproject_pins()
    assert pins, "pyproject.toml no longer pins torch/torchvision"
    setup = prepared["worker_setup_commands"]
    assert setup == prepared["head_setup_commands"][:len(setup)]
    torch_cmd = next(c for c in setup if "torch==" in c)
    for name, version in pins.items():
        assert f"{name}=={version}" in torch_cmd
    install = next(i for i, c in enumerate(setup) if re.search(r"pip install .*-e ~/wsis-ray", c))
    assert install > setup.index(torch_cmd)
    # The project files pip needs are mounted, and exist in the repository.
    mounts = {r: l for r, l in cluster["file_mounts"].items() if r.startswith("~/wsis-ray")}
    assert {"~/wsis-ray/pyproject.toml", "~/wsis-ray/wsis_ray"} <= set(mounts)
    for local in mounts.values():
        assert (ROOT / local).exists(), f"file_mounts source {local} missing"
    image = cluster["docker"]["image"]
    import ray
    assert image.startswith("rayproject/ray:" + ray.__version__) and "py311" in image


# -- k8s/rayjob.yaml -------------------------------------------------------------------
def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def test_rayjob_runs_round_py_with_object_store_run_dir(rayjob):
    import ray

    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "jobs/round.py"]
    assert argv[argv.index("--config") + 1] == "configs/voc.yaml"
    assert argv[argv.index("--run-dir") + 1].startswith("s3://")
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"]
    cluster_spec = spec["rayClusterSpec"]
    assert cluster_spec["rayVersion"] == ray.__version__
    assert cluster_spec["authOptions"]["mode"] == "token"
    assert cluster_spec["enableInTreeAutoscaling"] is True


def test_rayjob_gpu_group_scales_from_zero_with_limits(rayjob):
    cluster_spec = rayjob["spec"]["rayClusterSpec"]
    head = cluster_spec["headGroupSpec"]
    groups = cluster_spec["workerGroupSpecs"]
    gpu_groups = [g for g in groups
                  if any(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1
                         for c in _containers(g["template"]))]
    assert len(gpu_groups) == 1
    gpu = gpu_groups[0]
    assert gpu["minReplicas"] == 0 and gpu.get("replicas", 0) == 0
    assert gpu["maxReplicas"] >= 1
    pods = [head["template"]] + [g["template"] for g in groups]
    for pod in pods:
        assert pod["spec"].get("serviceAccountName"), "S3 access comes from a service account"
        for c in _containers(pod):
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), (c["name"], kind)
    assert all("nvidia.com/gpu" not in c["resources"]["limits"]
               for c in _containers(head["template"])), "the head is CPU only"


def _walk(node, path=()):
    """Yields (path, key, value) for every mapping entry in a YAML tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield path, k, v
            yield from _walk(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, path + (i,))


def test_rayjob_dashboard_not_exposed(rayjob):
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress", False)
    for _, key, value in _walk(rayjob):
        assert not (key in ("type", "serviceType") and value == "LoadBalancer")


def test_dockerfile_matches_cluster_image(cluster):
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM (\S+)", text, re.M).group(1) == cluster["docker"]["image"]
    for name, version in _pyproject_pins().items():
        assert f"{name}=={version}" in text
    for src in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M):
        for path in src.split():
            assert (ROOT / path).exists() or path in ("jobs", "configs"), path


# -- no credentials in any deployment file -----------------------------------------------
# Identifier-like keys naming a credential (file paths and *Name/*Ref references excluded).
_SECRET_KEY = re.compile(
    r"(?i)^(?!.*(name|ref)$)[a-z0-9_]*(secret|passw|token|access_key|api_key)[a-z0-9_]*$")
_SECRET_TEXT = re.compile(
    r"AKIA[0-9A-Z]{16}|ASIA[0-9A-Z]{16}|aws_secret_access_key|aws_session_token"
    r"|-----BEGIN [A-Z ]*PRIVATE KEY|RAY_AUTH_TOKEN\s*[=:]\s*\S", re.I)


def find_secrets(text: str) -> list[str]:
    """Secret-looking keys (with literal values) and values in a YAML document."""
    found = [m.group(0) for m in _SECRET_TEXT.finditer(text)]
    for doc in yaml.safe_load_all(text):
        for _, key, value in _walk(doc):
            if isinstance(key, str) and _SECRET_KEY.match(key) and isinstance(value, str):
                found.append(f"{key}: {value}")
            # Kubernetes env entries: a token/secret must come from valueFrom, not value.
            if isinstance(value, dict) and "value" in value and _SECRET_KEY.match(
                    str(value.get("name", ""))):
                found.append(f"env {value['name']}")
            if isinstance(value, list):
                for item in value:
                    if isinstance(item, dict) and "value" in item and _SECRET_KEY.match(
                            str(item.get("name", ""))):
                        found.append(f"env {item['name']}")
    return found


def test_secret_detector_catches_planted_credentials():
    planted = [
        "provider: {aws_secret_access_key: abc}",
        "node_config: {UserData: 'export AWS_ACCESS_KEY_ID=AKIAABCDEFGHIJKLMNOP'}",
        "env: [{name: RAY_AUTH_TOKEN, value: abc123}]",
        "auth: {ssh_password: hunter2}",
    ]
    for text in planted:
        assert find_secrets(text), text
    assert not find_secrets("file_mounts: {'~/.ray/auth_token': '~/.ray/auth_token'}")
    assert not find_secrets("authOptions: {mode: token, secretName: my-token}")
    assert not find_secrets(
        "env: [{name: RAY_AUTH_TOKEN, valueFrom: {secretKeyRef: {name: c, key: auth_token}}}]")


@pytest.mark.parametrize("path", [CLUSTER_YAML, RAYJOB_YAML], ids=lambda p: p.name)
def test_no_credentials_in_files(path):
    assert find_secrets(path.read_text()) == []


# -- .rayignore ---------------------------------------------------------------------------
def test_rayignore_keeps_env_data_runs_out_of_the_upload(tmp_path):
    """Ray's own upload walk over a skeleton repo: .venv/, data/, runs/ stay home (pruned,
    never walked), the code (including the package wsis_ray/data/) goes up."""
    from ray._private.runtime_env.packaging import _dir_travel

    files = [".venv/lib/python3.11/site-packages/torch/lib.so", "data/demo/train/0.png",
             "runs/demo/manifest.json", "wsis_ray/__init__.py", "wsis_ray/data/records.py",
             "wsis_ray/__pycache__/run.cpython-311.pyc", "jobs/round.py",
             "configs/voc.yaml", "pyproject.toml"]
    for f in files:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("x")
    shutil.copy(RAYIGNORE, tmp_path / ".rayignore")

    seen: list[str] = []
    _dir_travel(tmp_path, [], lambda p: seen.append(os.path.relpath(p, tmp_path)),
                include_gitignore=False)
    uploaded = {p for p in seen if (tmp_path / p).is_file()}
    assert {"wsis_ray/__init__.py", "wsis_ray/data/records.py", "jobs/round.py",
            "configs/voc.yaml", "pyproject.toml"} <= uploaded
    for top in (".venv", "data", "runs"):
        assert not any(p == top or p.startswith(top + "/") for p in seen), top
    assert not any("__pycache__" in p for p in uploaded)


# -- fits the paper's configuration -----------------------------------------------------
def test_cluster_fits_voc_training(cluster, rayjob):
    """One Train worker (cpus_per_worker CPUs + 1 GPU) must fit on one GPU node, and there
    must be enough GPU nodes for train.num_workers; otherwise the job waits forever."""
    if not VOC_CONFIG.exists():
        pytest.skip("configs/voc.yaml not in this checkout")
    train = _load(VOC_CONFIG).get("train", {})
    if not train.get("use_gpu"):
        pytest.skip("configs/voc.yaml does not train on GPUs")
    num_workers = int(train.get("num_workers", 1))
    cpus = float(train.get("cpus_per_worker", 1.0))
    (worker,) = _gpu_worker_types(cluster).values()
    assert worker["resources"]["CPU"] >= cpus and worker["max_workers"] >= num_workers
    (gpu,) = [g for g in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
              if g["groupName"] == "gpu"]
    limits = _containers(gpu["template"])[0]["resources"]["limits"]
    assert float(limits["cpu"]) >= cpus and gpu["maxReplicas"] >= num_workers
