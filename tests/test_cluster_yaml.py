"""cluster.yaml passes Ray's own cluster-config validation and agrees with the project: Ray
version, the node types that configs and docs name, and the GPU counts the GPU configs ask for."""
import copy
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from svis_ray.config import load_config
from svis_ray.tuning import load_sweep

ROOT = Path(__file__).resolve().parent.parent
GPU_CONFIGS = ["ytvis19_r50_1frame.yaml", "ytvis19_r50_full.yaml"]


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def node_types_named_in(path: Path) -> dict[str, str]:
    """The ``# cluster.yaml node types: {role: node type}`` line of a config."""
    m = re.search(r"^# cluster\.yaml node types: (\{.*\})$", path.read_text(), re.M)
    assert m, f"{path.name}: no '# cluster.yaml node types: {{...}}' line"
    return yaml.safe_load(m.group(1))


def test_ray_validation_accepts_it(cluster):
    validate_config(prepare_config(copy.deepcopy(cluster)))


@pytest.mark.parametrize("mutate", [
    lambda c: c.update(setup_comands=c.pop("setup_commands")),  # misspelt top-level key
    lambda c: c["available_node_types"]["student_gpu"].update(resourcez={"GPU": 8}),
    lambda c: c["available_node_types"]["teacher_gpu"]["resources"].update(GPU=0.5),  # must be integers
    lambda c: c.update(head_node_type="head"),
])
def test_ray_validation_rejects_a_broken_copy(cluster, mutate):
    broken = copy.deepcopy(cluster)
    mutate(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_config(prepare_config(broken))


def test_image_runs_the_pinned_ray_and_cuda(cluster):
    tag = re.fullmatch(r"rayproject/ray(?:-ml)?:(\d+\.\d+\.\d+)-py(\d)(\d+)-cu(\d+)", cluster["docker"]["image"])
    assert tag, cluster["docker"]["image"]  # a pinned CUDA build, not the moving -gpu alias
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pin = next(re.search(r">=(\d+\.\d+),<", d).group(1) for d in deps if d.startswith("ray["))
    assert tag.group(1).startswith(pin + ".")
    assert tag.group(1) == ray.__version__
    # torch is installed for the image's CUDA, before the project (whose torch requirement it meets)
    torch_cmds = [i for i, c in enumerate(cluster["setup_commands"]) if re.search(r"pip install .*\btorch==", c)]
    assert torch_cmds, cluster["setup_commands"]
    cmd = cluster["setup_commands"][torch_cmds[0]]
    assert cmd.rstrip().endswith(f"download.pytorch.org/whl/cu{tag.group(4)}"), cmd
    editable = next(i for i, c in enumerate(cluster["setup_commands"]) if " -e " in c)
    assert torch_cmds[0] < editable


def test_head_runs_no_cpu_work(cluster):
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"]["CPU"] == 0 and head["resources"].get("GPU", 0) == 0


def test_setup_installs_the_synced_tree(cluster):
    installed = [c.split()[-1] for c in cluster["setup_commands"] if "pip install" in c and " -e " in c]
    assert installed and installed[0] in cluster["file_mounts"]


def test_every_node_type_sizes_shm(cluster):
    assert any(o.startswith("--shm-size=") for o in cluster["docker"]["head_run_options"])
    for name, t in cluster["available_node_types"].items():
        if name != cluster["head_node_type"]:
            assert any(o.startswith("--shm-size=") for o in t["docker"]["worker_run_options"]), name


def test_docs_table_matches_node_types(cluster):
    types = cluster["available_node_types"]
    rows = re.findall(r"^\| `(\w+)` \| ([\w.]+) \| (\d+) \|", (ROOT / "docs" / "cluster.md").read_text(), re.M)
    assert {name for name, _, _ in rows} == set(types)
    for name, instance, gpus in rows:
        assert types[name]["node_config"]["InstanceType"] == instance
        assert types[name]["resources"].get("GPU", 0) == int(gpus)


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_gpu_config_fits_its_node_types(cluster, name):
    types = cluster["available_node_types"]
    roles = node_types_named_in(ROOT / "configs" / name)
    assert set(roles.values()) <= set(types)
    cfg = load_config(ROOT / "configs" / name)
    student = types[roles["student"]]
    assert cfg.train.use_gpu
    # the role resource the workers ask for exists on the student node type only, one per worker
    role = cfg.train.node_resource
    assert role and student["resources"].get(role, 0) >= cfg.train.num_workers
    assert [n for n, t in types.items() if role in t["resources"]] == [roles["student"]]
    # all workers of a run fit one student node (PACK, no cross-node DDP), CPUs included
    assert cfg.train.num_workers <= student["resources"]["GPU"]
    assert cfg.train.num_workers * cfg.train.cpus_per_worker < student["resources"]["CPU"]
    if cfg.teacher.mode != "online":
        teacher = types[roles["teacher"]]
        assert cfg.teacher.gpus_per_teacher <= teacher["resources"]["GPU"]
        role = cfg.teacher.node_resource
        assert role and teacher["resources"].get(role, 0) >= 1
        assert [n for n, t in types.items() if role in t["resources"]] == [roles["teacher"]]
        # teachers fill their node types' role slots, not more
        assert cfg.teacher.num_teachers <= teacher["resources"][role] * teacher["max_workers"]
        assert (cfg.teacher.num_teachers * cfg.teacher.gpus_per_teacher
                <= teacher["resources"]["GPU"] * teacher["max_workers"])


def test_cluster_sweep_fits_at_max_workers(cluster):
    types = cluster["available_node_types"]
    path = ROOT / "configs" / "tune_ytvis19_r50.yaml"
    roles = node_types_named_in(path)
    sweep = load_sweep(path)
    cfg, trials = sweep.base, sweep.settings.tune.max_concurrent_trials
    student, teacher = types[roles["student"]], types[roles["teacher"]]
    assert trials * cfg.train.num_workers <= student["resources"]["GPU"] * student["max_workers"]
    evaluation = cfg.train.eval_resources  # one held-out evaluation task per trial at a time
    assert (trials * (cfg.teacher.num_teachers * cfg.teacher.gpus_per_teacher + evaluation.get("GPU", 0))
            <= teacher["resources"]["GPU"] * teacher["max_workers"])
    for k, v in evaluation.items():  # the evaluation task fits the node type that holds its role resource
        if k not in ("CPU", "GPU"):
            assert teacher["resources"].get(k, 0) >= v
            assert trials * (cfg.teacher.num_teachers + v) <= teacher["resources"][k] * teacher["max_workers"]
    assert evaluation.get("CPU", 0) <= teacher["resources"]["CPU"]
    assert sum(t.get("max_workers", 0) for t in types.values()) <= cluster["max_workers"]
    # trial drivers hold no CPU (the head has none) but a slot the head advertises, enough for all trials
    driver = sweep.settings.tune.driver_resources
    head = types[cluster["head_node_type"]]
    assert driver.get("CPU", 0) == 0 and driver.get("GPU", 0) == 0
    assert all(head["resources"].get(k, 0) >= trials * v for k, v in driver.items() if v > 0)
