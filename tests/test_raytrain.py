"""The Ray Train plumbing both training loops share, outside a Ray Train session (no workers started)."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray.train
import torch

from rabtriever_ray.raytrain import (
    CheckpointReporter,
    fault_hook,
    load_training_state,
    peak_memory_metrics,
    warmup_cosine_scheduler,
)


def test_warmup_cosine_scheduler_warms_up_linearly_then_decays_to_zero():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = warmup_cosine_scheduler(optimizer, warmup_steps=4, total_steps=12)
    lrs = []
    for _ in range(14):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[8] == pytest.approx(0.5)  # half-way through the decay
    assert lrs[12:] == pytest.approx([0.0, 0.0])  # stays at 0 past the end
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))


def test_fault_hook_fails_rank_zero_once(tmp_path):
    marker = tmp_path / "failed"
    config = {"fail_once_after_step": (str(marker), 3)}
    fault_hook(config, rank=0, step=2)
    fault_hook(config, rank=1, step=3)
    fault_hook({}, rank=0, step=3)
    with pytest.raises(RuntimeError, match="injected worker failure at step 3"):
        fault_hook(config, rank=0, step=3)
    assert marker.read_text() == "3"
    fault_hook(config, rank=0, step=4)  # the restarted worker runs on


def test_peak_memory_metrics_names_both_keys_per_worker():
    metrics = peak_memory_metrics(torch.device("cpu"), world=1)
    assert list(metrics) == ["worker_peak_rss_mb"] and metrics["worker_peak_rss_mb"][0] > 0


def test_checkpoint_reporter_writes_the_layout_that_load_training_state_reads(monkeypatch, tmp_path):
    reported = []

    def report(metrics, checkpoint=None):  # what Ray Train would persist: a copy of the directory
        shutil.copytree(checkpoint.path, tmp_path / "checkpoint")
        reported.append(metrics)

    monkeypatch.setattr(ray.train, "report", report)
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    scheduler = warmup_cosine_scheduler(optimizer, 1, 4)
    weight.grad = torch.ones(2)
    optimizer.step()
    scheduler.step()
    cfg = SimpleNamespace(strategy="ddp")
    reporter = CheckpointReporter(
        cfg, 0, 1, optimizer, scheduler, lambda directory, state: (directory / "model.txt").write_text("w")
    )
    reporter.report({"step": 1}, [{"step": 1}], epoch=0, step=1)
    directory = tmp_path / "checkpoint"
    assert reported == [{"step": 1}]
    assert {p.name for p in directory.iterdir()} == {
        "optimizer.pt",
        "training_state.pt",
        "history.json",
        "model.txt",
    }
    state, optimizer_state, history = load_training_state(directory, cfg, 0, 1)
    assert (state["epoch"], state["step"], state["strategy"], state["world_size"]) == (0, 1, "ddp", 1)
    assert state["scheduler"] == scheduler.state_dict()
    assert history == json.loads(Path(directory / "history.json").read_text()) == [{"step": 1}]
    restored = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    restored.load_state_dict(optimizer_state)
    assert torch.equal(
        restored.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"]
    )
    with pytest.raises(ValueError, match="strategy='ddp'"):
        load_training_state(directory, SimpleNamespace(strategy="deepspeed"), 0, 1)


def test_a_rerun_resumes_only_the_run_it_names(tmp_path):
    """``rabtriever_run.json`` beside the checkpoints: the same run resumes; another config or changed input files
    are refused naming what differs; cluster shape may change; ``resume=any`` resumes anyway."""
    import dataclasses
    import os

    from rabtriever_ray.config import DistillConfig
    from rabtriever_ray.runs import check_resume, run_fingerprint

    data = tmp_path / "data"
    data.mkdir()
    (data / "corpus.jsonl").write_text('{"_id": "d1", "text": "x"}\n')
    config = DistillConfig(lr=1e-3)
    run = tmp_path / "storage" / "demo"
    check_resume(run, run_fingerprint(config, {"train": [data]}), "same")  # nothing to resume: recorded
    (run / "checkpoint_2026-12-07_00-00-00.000000").mkdir()
    reshaped = dataclasses.replace(config, num_workers=4, cpus_per_worker=0.5, verbose=True, max_failures=3)
    check_resume(run, run_fingerprint(reshaped, {"train": [data]}), "same")  # the same run, another cluster shape
    other = dataclasses.replace(config, lr=2e-3, loss=dataclasses.replace(config.loss, temperature=2.0))
    with pytest.raises(ValueError, match=r"what differs: loss.temperature \(1.0 -> 2.0\), lr \(0.001 -> 0.002\)"):
        check_resume(run, run_fingerprint(other, {"train": [data]}), "same")
    os.utime(data / "corpus.jsonl", ns=(1, 1))  # the data file rewritten
    with pytest.raises(ValueError, match=r"what differs: files:train\. Give this run another name"):
        check_resume(run, run_fingerprint(config, {"train": [data]}), "same")
    check_resume(run, run_fingerprint(other, {"train": [data]}), "any")
