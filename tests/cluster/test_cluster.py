"""cluster.yaml, checked offline: Ray's own schema and checks, the image's Ray version, the layout.

Nothing here calls a cloud API: ``prepare_config`` merges the AWS defaults shipped with Ray and
``validate_config`` runs Ray's JSON schema plus its cross-field checks, as ``ray up`` does
before it touches AWS.
"""

from __future__ import annotations

import copy
import fnmatch
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def pinned_ray_version() -> str:
    """The exact Ray version pyproject.toml pins (read as text: tomllib needs Python 3.11)."""
    pins = re.findall(r'"ray(?:\[[^\]]*\])?==([\w.]+)"', (REPO / "pyproject.toml").read_text())
    assert len(pins) == 1, pins
    return pins[0]


def test_cluster_yaml_passes_rays_own_validation(cluster):
    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    assert set(prepared["available_node_types"]) == {"head", "gpu_worker", "cpu_worker"}


def _typo_in_a_top_level_key(c: dict) -> None:
    c["max_worker"] = c.pop("max_workers")


def _unknown_head_node_type(c: dict) -> None:
    c["head_node_type"] = "ray.head.default"


def _text_where_a_resource_count_goes(c: dict) -> None:
    c["available_node_types"]["head"]["resources"] = {"CPU": "none"}


def _more_minimum_workers_than_the_global_cap(c: dict) -> None:
    c["available_node_types"]["gpu_worker"]["min_workers"] = c["max_workers"] + 1


def _node_type_without_node_config(c: dict) -> None:
    del c["available_node_types"]["cpu_worker"]["node_config"]


@pytest.mark.parametrize("breakage, message", [pytest.param(f, m, id=f.__name__.strip("_")) for f, m in [
    (_typo_in_a_top_level_key, "'max_worker' was unexpected"),
    (_unknown_head_node_type, "`head_node_type` must be one of `available_node_types`"),
    (_text_where_a_resource_count_goes, "'none' is not of type 'integer'"),
    (_more_minimum_workers_than_the_global_cap, "smaller than the sum of `min_workers`"),
    (_node_type_without_node_config, "'node_config' is a required property"),
]])
def test_a_broken_copy_fails_validation(cluster, breakage, message):
    broken = copy.deepcopy(cluster)
    breakage(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError), match=re.escape(message)):
        validate_config(prepare_config(broken))


def test_image_carries_the_pinned_ray_version_which_is_the_installed_one(cluster):
    """The tag names the Ray pinned in pyproject.toml (installed here) and a supported Python."""
    image = cluster["docker"]["image"]
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-gpu", image)
    assert match, f"{image} is not a rayproject/ray:<version>-py3XX-gpu tag"
    assert match.group(1) == pinned_ray_version() == ray.__version__
    floor = re.search(r'requires-python = ">=(\d+)\.(\d+)"', (REPO / "pyproject.toml").read_text())
    assert (int(match.group(2)), int(match.group(3))) >= (int(floor.group(1)), int(floor.group(2)))


def test_head_runs_no_tasks_and_both_worker_groups_scale_from_zero(cluster):
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] == "head"
    assert types["head"]["resources"] == {"CPU": 0}
    assert types["gpu_worker"]["node_config"]["InstanceType"].startswith("g5.")
    assert types["cpu_worker"]["node_config"]["InstanceType"].startswith("c5.")
    for name in ("gpu_worker", "cpu_worker"):
        assert types[name]["min_workers"] == 0 < types[name]["max_workers"]
    assert sum(types[n]["max_workers"] for n in ("gpu_worker", "cpu_worker")) <= cluster["max_workers"]


def test_every_node_reaches_s3_through_the_same_instance_profile(cluster):
    profiles = {name: t["node_config"].get("IamInstanceProfile")
                for name, t in cluster["available_node_types"].items()}
    assert all(profiles.values()), profiles
    assert len({str(p) for p in profiles.values()}) == 1, profiles


def test_setup_commands_install_the_wheel_that_the_file_mount_carries(cluster, tmp_path):
    """Builds the project's wheel as the README says (from a copy, to leave the checkout alone)
    and checks the setup commands' glob finds it and that it pins the image's Ray."""
    (mount_target, mount_source), = cluster["file_mounts"].items()
    assert mount_source == "./dist"
    src = tmp_path / "src"
    shutil.copytree(REPO / "basnet", src / "basnet", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, timeout=300)
    wheel, = (tmp_path / "dist").glob("*.whl")

    globs = [w for cmd in cluster["setup_commands"] for w in cmd.split() if w.endswith(".whl")]
    assert globs and all(g.startswith(mount_target + "/") for g in globs)
    assert all(fnmatch.fnmatch(f"{mount_target}/{wheel.name}", g) for g in globs)
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "basnet/train/ray_trainer.py" in names
    assert re.search(rf"^Requires-Dist: ray\[[^\]]*\]==({re.escape(pinned_ray_version())})$", metadata, re.M)
