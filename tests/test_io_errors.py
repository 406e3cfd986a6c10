"""A job that fails inside a Ray actor, task or training worker ends with one line naming the cause (rule 16)."""

import re
import sys

import pytest
from ray import cloudpickle

from rabtriever_ray.causes import root_cause
from rabtriever_ray.io import MANIFEST, OutputExistsError, atomic_dir
from rabtriever_ray.runtime import run_job

# Ray workers cannot import this test module: send its UDF classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])
WHERE = r"pid \d+ on [\d.]+"


def run_failing(main, capsys):
    """Run ``main`` through `run_job`; returns (exit status, stderr lines)."""
    with pytest.raises(SystemExit) as exit_info:
        run_job(main)
    return exit_info.value.code, capsys.readouterr().err.splitlines()


def error_lines(lines):
    return [line for line in lines if line.startswith("error:")]


class RaisesOnCall:
    """A Ray Data UDF with a bad-input error in its data; counts its calls in ``calls_file``."""

    def __init__(self, calls_file):
        self.calls_file = calls_file

    def __call__(self, batch):
        with open(self.calls_file, "a") as handle:
            handle.write("call\n")
        raise ValueError("bad field 'x' in file f line 3")


class RaisesOnInit:
    """A Ray Data UDF whose constructor fails the way a model load does: a bad-input error chained from another."""

    def __init__(self):
        try:
            {}["model.safetensors"]
        except KeyError as err:
            raise FileNotFoundError("teacher weights not found: /models/foo/model.safetensors") from err

    def __call__(self, batch):
        return batch


def map_with(udf, **kwargs):
    import ray.data
    from ray.data import ActorPoolStrategy

    # One block of 4 rows, one batch: a retried batch would call the UDF twice.
    data = ray.data.range(4, override_num_blocks=1)
    return data.map_batches(udf, batch_size=4, compute=ActorPoolStrategy(size=1), num_cpus=0.25, **kwargs)


def test_data_actor_error_is_one_line_bad_input_and_not_retried(ray_local, capsys, tmp_path):
    calls = tmp_path / "calls"
    status, lines = run_failing(
        lambda: map_with(RaisesOnCall, fn_constructor_kwargs={"calls_file": str(calls)}).materialize(), capsys
    )
    print("\n".join(lines[-1:]))  # shown with pytest -s
    assert status == 2 and len(error_lines(lines)) == 1 and "Traceback" not in "\n".join(lines)
    assert re.fullmatch(
        rf"error: ValueError: bad field 'x' in file f line 3 \(in Ray Data actor MapBatches\(RaisesOnCall\), {WHERE}\)",
        lines[-1],
    ), lines[-1]
    assert "To change retry attempts" not in lines[-1]
    # An application error is not an actor death: Ray Data does not retry the batch (retry_exceptions holds only
    # RaySystemError, max_map_retries is 0), so the user's error surfaces after one call.
    assert calls.read_text().splitlines() == ["call"]


def test_data_actor_init_error_names_what_the_constructor_raised(ray_local, capsys):
    status, lines = run_failing(lambda: map_with(RaisesOnInit).materialize(), capsys)
    print("\n".join(lines[-1:]))
    # FileNotFoundError (what __init__ raised), not the KeyError it chained from nor Ray's ActorDiedError.
    assert status == 2 and len(error_lines(lines)) == 1
    assert re.fullmatch(
        r"error: FileNotFoundError: teacher weights not found: /models/foo/model.safetensors "
        rf"\(in Ray Data actor MapBatches\(RaisesOnInit\) while starting, {WHERE}\)",
        lines[-1],
    ), lines[-1]


def test_task_error_is_one_line_after_its_traceback(ray_local, capsys):
    @ray_local.remote(num_cpus=0.25)
    def stack_rows():
        raise RuntimeError(
            "stack expects each tensor to be equal size, but got [3] at entry 0 and [2] at entry 1"
        )

    status, lines = run_failing(lambda: ray_local.get(stack_rows.remote()), capsys)
    print("\n".join(lines[-1:]))
    # Not bad input: a bug, so the traceback (the worker's included) comes first, the one line last.
    assert status == 1 and len(error_lines(lines)) == 1 and lines[0].startswith("Traceback")
    assert re.fullmatch(
        r"error: RuntimeError: stack expects each tensor to be equal size, but got \[3\] at entry 0 and \[2\] at "
        rf"entry 1 \(in Ray task .*stack_rows, {WHERE}\)",
        lines[-1],
    ), lines[-1]


def test_train_worker_errors_name_the_lowest_failed_rank(capsys):
    # The exceptions TorchTrainer.fit raises (Ray Train V2), built directly: a real run costs ~20 s on 2 CPUs
    # and was checked by hand (same line, from a worker's ValueError).
    from ray.train import ControllerError, WorkerGroupError

    def fit():
        raise WorkerGroupError(
            "rank 0: ValueError ...; rank 1: ValueError ...",
            {
                1: RuntimeError("rank 1 lost its peer"),
                0: ValueError("cannot find the final norm of FooForCausalLM"),
            },
        )

    status, lines = run_failing(fit, capsys)
    assert status == 2 and lines == [
        "error: ValueError: cannot find the final norm of FooForCausalLM "
        "(in training worker rank 0, one of 2 failed ranks)"
    ]
    cause = root_cause(ControllerError(RuntimeError("scheduling failed")))
    assert str(cause) == "RuntimeError: scheduling failed (in the Ray Train controller)"


def test_bad_input_in_this_process_is_its_message_alone(capsys, monkeypatch):
    def main():
        raise OutputExistsError("runs/x already holds a finished run; pass --overwrite")

    status, lines = run_failing(main, capsys)
    assert status == 2 and lines == [
        "error: OutputExistsError: runs/x already holds a finished run; pass --overwrite"
    ]
    monkeypatch.setenv("RABTRIEVER_TRACEBACK", "1")
    status, lines = run_failing(main, capsys)
    assert (
        status == 2 and lines[0].startswith("Traceback") and lines[-1].startswith("error: OutputExistsError")
    )


def test_root_cause_of_an_exception_outside_ray_is_itself():
    err = KeyError("k")
    cause = root_cause(err)
    assert (cause.type, cause.where, str(cause)) == (KeyError, None, "KeyError: 'k'")


# -- atomic output folders ---------------------------------------------------------------------------------------


def test_atomic_dir_commits_on_success_and_leaves_nothing_on_error(tmp_path):
    out = tmp_path / "run"
    with atomic_dir(out) as staging:
        assert staging.parent == tmp_path and staging.is_dir() and not out.exists()
        (staging / MANIFEST).write_text("{}")
    assert (out / MANIFEST).read_text() == "{}" and [p.name for p in tmp_path.iterdir()] == ["run"]

    with pytest.raises(OutputExistsError, match="already holds a finished run; pass --overwrite"):
        with atomic_dir(out):
            pytest.fail("entered the block for a finished output")

    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_dir(out, overwrite=True) as staging:
            (staging / "partial.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert [p.name for p in tmp_path.iterdir()] == ["run"] and sorted(p.name for p in out.iterdir()) == [
        MANIFEST
    ]

    with pytest.raises(KeyError):
        with atomic_dir(tmp_path / "fresh") as staging:
            raise KeyError("k")
    assert [p.name for p in tmp_path.iterdir()] == ["run"]

    with atomic_dir(out, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"] and [p.name for p in tmp_path.iterdir()] == ["run"]


def test_a_crash_between_the_two_renames_is_repaired_and_dead_runs_staging_is_removed(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys

    import rabtriever_ray.io as io

    out = tmp_path / "run"
    with atomic_dir(out) as staging:
        (staging / MANIFEST).write_text('{"v": 1}')
    # A replacement that dies after moving the finished folder aside, before moving the new one in.
    real_rename = os.rename

    def crash_on_the_second(src, dst):
        if ".partial-" in str(src):
            raise KeyboardInterrupt("killed")
        real_rename(src, dst)

    monkeypatch.setattr(io.os, "rename", crash_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(out, overwrite=True) as staging:
            (staging / MANIFEST).write_text('{"v": 2}')
    monkeypatch.setattr(io.os, "rename", real_rename)
    assert not out.exists() and [p.name.split("-")[0] for p in tmp_path.iterdir()] == [".run.old"]

    # Staging folders: one of a process that died, one of this live process, one written elsewhere long ago.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = io.socket.gethostname()
    for name, owner in (("dead", f"{host} {dead.stdout.strip()}"), ("live", f"{host} {os.getpid()}")):
        (tmp_path / f".run.partial-{name}").mkdir()
        (tmp_path / f".run.partial-{name}" / io.OWNER).write_text(owner)
    elsewhere = tmp_path / ".run.partial-elsewhere"
    elsewhere.mkdir()
    (elsewhere / io.OWNER).write_text("another-host 1")
    os.utime(elsewhere, (1, 1))

    # The next run finds the finished folder back in place (so it refuses to overwrite it) and only the live
    # run's staging folder left beside it.
    with pytest.raises(OutputExistsError, match="already holds a finished run"):
        with atomic_dir(out):
            pytest.fail("entered the block for a finished output")
    assert (out / MANIFEST).read_text() == '{"v": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run.partial-live", "run"]
