"""`rabtriever_ray.raycompat` against the installed Ray: each private attribute or function it relies on is still
there, with the signature it calls, and still means what it did. A Ray upgrade that renames or removes one fails
here, by name, rather than in a training run or a job's error report. No cluster is started."""

import ast
import inspect
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import ray.exceptions
from ray.train import DataConfig

from rabtriever_ray import raycompat

ROOT = Path(__file__).resolve().parent.parent


def require(owner, attribute: str, user: str):
    """``owner.attribute``, or a failure naming what relies on it (``user``)."""
    name = getattr(owner, "__qualname__", type(owner).__qualname__)
    assert hasattr(owner, attribute), (
        f"Ray {ray.__version__}: {name} has no {attribute!r} any more; `{user}` relies on it: "
        "find what replaced it in this Ray and update rabtriever_ray/raycompat.py (and the pinned Ray)"
    )
    return getattr(owner, attribute)


def require_call(function, user: str, *args, **kwargs) -> None:
    """``function`` accepts the arguments ``user`` passes it."""
    try:
        inspect.signature(function).bind(*args, **kwargs)
    except TypeError as err:
        pytest.fail(
            f"Ray {ray.__version__}: {function.__qualname__}{inspect.signature(function)} no longer takes the "
            f"arguments `{user}` passes ({err}); update rabtriever_ray/raycompat.py"
        )


def test_data_config_keeps_its_arguments_where_whole_block_split_reads_them():
    split_some = DataConfig(datasets_to_split=["train"], enable_shard_locality=False)
    require(split_some, "_datasets_to_split", "raycompat.datasets_to_split")
    require(split_some, "_enable_shard_locality", "raycompat.shard_locality")
    resolve = require(split_some, "_resolve_execution_options", "raycompat.execution_options")
    require_call(resolve, "raycompat.execution_options", "train")
    # WholeBlockSplit overrides configure (a DeveloperAPI) and calls it for the datasets it does not split.
    require_call(DataConfig.configure, "raytrain.WholeBlockSplit", DataConfig(), {}, 2, None, None)

    assert raycompat.datasets_to_split(split_some, {"train", "val"}) == {"train"}
    assert raycompat.datasets_to_split(DataConfig(), {"train", "val"}) == {"train", "val"}
    assert raycompat.shard_locality(split_some) is False and raycompat.shard_locality(DataConfig()) is True

    default = raycompat.execution_options(DataConfig(), "train")
    assert type(default) is type(DataConfig.default_ingest_options())
    from ray.data import ExecutionOptions

    mine = ExecutionOptions(preserve_order=True)
    given = raycompat.execution_options(DataConfig(execution_options={"train": mine}), "train")
    assert given.preserve_order and given is not mine  # a copy: a shard's options never alias the user's
    assert raycompat.execution_options(DataConfig(execution_options={"train": mine}), "val") == default


def test_train_worker_exceptions_are_found_in_ray_trains_wrapper():
    try:
        from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    except ImportError as err:
        pytest.fail(
            f"Ray {ray.__version__}: Ray Train's UserExceptionWithTraceback moved ({err}); find where Ray Train "
            "wraps a worker's exception now and update `raycompat.train_user_exception`"
        )
    raised = ValueError("cannot find the final norm of FooForCausalLM")
    wrapped = UserExceptionWithTraceback(raised, "Traceback (most recent call last):\n...")
    require(wrapped, "_base_exc", "raycompat.train_user_exception")
    assert raycompat.train_user_exception(wrapped) is raised
    assert str(raycompat.train_user_exception(pickle.loads(pickle.dumps(wrapped)))) == str(raised)
    assert raycompat.train_user_exception(raised) is None


def test_a_failed_actor_init_keeps_its_task_error_as_the_first_argument():
    task_error = ray.exceptions.RayTaskError(
        "MapWorker.__init__",
        "Traceback (most recent call last):\nFileNotFoundError: teacher weights not found",
        FileNotFoundError("teacher weights not found"),
        proctitle="ray::MapWorker.__init__",
        pid=12,
        ip="10.0.0.3",
    )
    died = ray.exceptions.ActorDiedError(task_error)
    assert died.actor_init_failed, (
        "Ray no longer builds ActorDiedError from the task error of a failed __init__"
    )
    assert raycompat.actor_init_error(died) is task_error, (
        f"Ray {ray.__version__}: ActorDiedError(task_error).args no longer starts with the task error; "
        "update `raycompat.actor_init_error`"
    )
    assert isinstance(
        raycompat.actor_init_error(pickle.loads(pickle.dumps(died))), ray.exceptions.RayTaskError
    )
    assert raycompat.actor_init_error(ray.exceptions.ActorDiedError()) is None
    assert raycompat.actor_init_error(task_error) is None


def test_serve_details_come_from_the_controller_client():
    import ray.serve.context
    from ray.serve._private.client import ServeControllerClient

    user = "raycompat.serve_details"
    require_call(require(ray.serve.context, "_get_global_client", user), user)
    require_call(require(ServeControllerClient, "get_serve_details", user), user, object())


def test_raycompat_and_causes_import_no_ray():
    """`causes.root_cause` tells Ray's errors from others only once Ray is imported: importing it must not."""
    code = "import sys, rabtriever_ray.causes, rabtriever_ray.raycompat; print('ray' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def private_ray_uses(path: Path) -> list[str]:
    """Where ``path`` names a private Ray module or attribute: ``from ray._private...``, ``from ray.x import _y``,
    ``ray.x._y``."""
    found = {}  # line -> the first private name on it

    def private(dotted: str) -> bool:
        return any(part.startswith("_") and not part.startswith("__") for part in dotted.split("."))

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and (node.module or "").split(".")[0] == "ray"
        ):
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names if alias.name.split(".")[0] == "ray"]
        elif isinstance(node, ast.Attribute) and ast.unparse(node).split(".")[0] == "ray":
            names = [ast.unparse(node)]
        for name in names:
            if private(name):
                found.setdefault(node.lineno, f"{path.relative_to(ROOT)}:{node.lineno}: {name}")
    return [found[line] for line in sorted(found)]


def test_only_raycompat_uses_rays_private_api():
    files = [p for d in ("rabtriever_ray", "jobs", "benchmarks") for p in sorted((ROOT / d).rglob("*.py"))]
    found = [use for path in files if path.name != "raycompat.py" for use in private_ray_uses(path)]
    assert not found, "Ray's private API outside rabtriever_ray/raycompat.py:\n" + "\n".join(found)
