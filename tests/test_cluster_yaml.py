"""ray_cluster.yaml, the KubeRay RayJob and its image: valid for the installed Ray, pinned like
pyproject.toml, token authentication on, no credentials in the files."""
from __future__ import annotations

import copy
import json
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement

REPO_ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO_ROOT / "ray_cluster.yaml"
RAYJOB_YAML = REPO_ROOT / "cluster" / "kuberay" / "rayjob.yaml"
DOCKERFILE = REPO_ROOT / "cluster" / "kuberay" / "Dockerfile"
CREDENTIAL_PATTERNS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),  # an AWS access key id
    re.compile(r"aws_secret_access_key", re.IGNORECASE),
    re.compile(r"aws_access_key_id", re.IGNORECASE),
    re.compile(r"aws_session_token", re.IGNORECASE),
    re.compile(r"RAY_AUTH_TOKEN\s*[:=]"),  # a token value written into a file
]


def pyproject_pins() -> dict[str, Requirement]:
    """The dependencies pyproject.toml pins with ==, by normalised name."""
    data = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    pins = {}
    for line in data["project"]["dependencies"]:
        req = Requirement(line)
        if any(spec.operator == "==" for spec in req.specifier):
            pins[req.name.lower()] = req
    return pins


def pip_install_requirements(command: str) -> list[Requirement]:
    """The requirement arguments of the `pip install` commands in a shell command line (paths,
    options and other commands are left out)."""
    requirements = []
    for part in re.split(r"&&|;|\|\|", command):
        words = shlex.split(part)
        while words and words[0] in ("RUN", "sudo"):
            words = words[1:]
        if len(words) < 2 or not words[0].endswith("pip") or words[1] != "install":
            continue
        for word in words[2:]:
            if word.startswith(("-", "~", "/", ".")) or word in ("-e",):
                continue
            requirements.append(Requirement(word))
    return requirements


def check_pins_match(requirements: list[Requirement], where: str) -> None:
    pins = pyproject_pins()
    by_name = {req.name.lower(): req for req in requirements}
    for name, pinned in pins.items():
        assert name in by_name, f"{where} does not install {pinned}"
        got = by_name[name]
        assert str(got.specifier) == str(pinned.specifier), f"{where}: {got} but pyproject pins {pinned}"
        assert got.extras >= pinned.extras, f"{where}: {got} lacks extras of {pinned}"
    for req in requirements:  # and nothing pinned there that pyproject pins differently or not at all
        if any(spec.operator == "==" for spec in req.specifier):
            assert req.name.lower() in pins, f"{where} pins {req}, which pyproject.toml does not pin"


@pytest.fixture(scope="module")
def cluster_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def ray_pin() -> str:
    return next(iter(pyproject_pins()["ray"].specifier)).version


# -- the helpers themselves -------------------------------------------------------------------
def test_pin_checker_catches_drift():
    good = pip_install_requirements('pip install "ray[default,train,tune,data]==2.60.0" "torch==2.14.1" '
                                    '"torchvision==0.29.1" && pip install -e ~/sonoray')
    assert [str(r) for r in good] == ["ray[data,default,train,tune]==2.60.0", "torch==2.14.1", "torchvision==0.29.1"]
    with pytest.raises(AssertionError, match="pyproject pins"):
        check_pins_match(pip_install_requirements('pip install "ray[default,train,tune,data]==2.60.0" '
                                                  '"torch==2.14.0" "torchvision==0.29.1"'), "x")
    with pytest.raises(AssertionError, match="does not install"):
        check_pins_match(pip_install_requirements('pip install "ray[default]==2.60.0" torch==2.14.1'), "x")
    with pytest.raises(AssertionError, match="lacks extras"):
        check_pins_match(pip_install_requirements(
            'pip install "ray[default]==2.60.0" torch==2.14.1 torchvision==0.29.1'), "x")


# -- ray_cluster.yaml ---------------------------------------------------------------------------
def test_cluster_yaml_validates_against_the_installed_ray_schema(cluster_config):
    import ray.autoscaler

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(cluster_config, json.loads(schema_path.read_text()))
    # and Ray's own checks after it fills in the AWS defaults, as `ray up` does before launching
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cluster_config)))


def test_cluster_yaml_schema_check_is_strict(cluster_config):
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    broken = copy.deepcopy(cluster_config)
    broken["available_node_types"]["gpu_worker"]["max_worker"] = 4  # a typo
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_setup_commands_pin_the_versions_of_pyproject(cluster_config):
    requirements = [req for command in cluster_config["setup_commands"] for req in pip_install_requirements(command)]
    check_pins_match(requirements, "ray_cluster.yaml setup_commands")
    assert any("~/sonoray" in command for command in cluster_config["setup_commands"])
    assert cluster_config["file_mounts"]["~/sonoray"] == "."


def test_docker_images_match_the_ray_pin(cluster_config):
    version = ray_pin()
    images = [cluster_config["docker"]["image"], cluster_config["docker"]["head_image"]]
    images += [t["docker"]["worker_image"] for t in cluster_config["available_node_types"].values() if "docker" in t]
    for image in images:
        assert image.startswith(f"rayproject/ray:{version}-py311"), image


def test_node_types_cpu_head_gpu_and_cpu_workers(cluster_config):
    types = cluster_config["available_node_types"]
    head = types[cluster_config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert types["gpu_worker"]["node_config"]["InstanceType"] in ("g5.xlarge", "g5.12xlarge")
    assert types["cpu_worker"]["node_config"]["InstanceType"] == "c6i.4xlarge"
    worker_types = [t for name, t in types.items() if name != cluster_config["head_node_type"]]
    for node_type in worker_types:
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"]
    assert sum(t["max_workers"] for t in worker_types) <= cluster_config["max_workers"]
    text = CLUSTER_YAML.read_text()
    for field in ("gpu_worker.min_workers / max_workers", "cpu_worker.min_workers / max_workers",
                  "InstanceType", "IamInstanceProfile", "max_workers (top level)"):
        assert field in text, f"the header should tell users to edit {field}"
    assert "no variable substitution" in text.lower()


def test_instance_profiles_and_no_credentials(cluster_config):
    for name, node_type in cluster_config["available_node_types"].items():
        assert node_type["node_config"]["IamInstanceProfile"]["Name"], name
    for path in (CLUSTER_YAML, RAYJOB_YAML, DOCKERFILE):
        text = path.read_text()
        for pattern in CREDENTIAL_PATTERNS:
            assert not pattern.search(text), f"{path.name} matches {pattern.pattern}"


def test_token_authentication_and_loopback_dashboard(cluster_config):
    starts = cluster_config["head_start_ray_commands"] + cluster_config["worker_start_ray_commands"]
    ray_starts = [c for c in starts if "ray start" in c]
    assert len(ray_starts) == 2
    for command in ray_starts:
        assert "RAY_AUTH_MODE=token ray start" in command
    head_start = next(c for c in cluster_config["head_start_ray_commands"] if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "--env RAY_AUTH_MODE=token" in cluster_config["docker"]["run_options"]
    # every node gets the token the laptop holds
    assert cluster_config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


# -- KubeRay ---------------------------------------------------------------------------------------
def test_rayjob_manifest():
    manifest = yaml.safe_load(RAYJOB_YAML.read_text())
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == "RayJob"
    spec = manifest["spec"]
    assert spec["entrypoint"].startswith("sonoray pretrain") and "--gpu" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    version = ray_pin()
    assert cluster["rayVersion"] == version
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    images = [c["image"] for g in groups for c in g["template"]["spec"]["containers"]]
    assert images and all(f"ray{version}-py311" in image.split(":")[-1] for image in images), images
    gpu = next(g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert 0 <= gpu["minReplicas"] <= gpu["maxReplicas"]


def test_kuberay_image_is_built_on_the_pinned_ray_and_pins_like_pyproject():
    text = DOCKERFILE.read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray_pin())}-py311-gpu$", text, re.MULTILINE)
    runs = [line for line in text.splitlines() if line.startswith("RUN ")]
    check_pins_match([req for line in runs for req in pip_install_requirements(line)], "Dockerfile")
