"""Low-precision inference: the int8 product, the quantised copy, and agreement measured and enforced."""

import dataclasses
import logging

import pytest
import torch
from helpers import TINY_TEACHER
from torch import nn

from rabtriever_ray import precision
from rabtriever_ray.config import ConfigError, ServeConfig, TeacherConfig, from_dict
from rabtriever_ray.families import decoder_layers
from rabtriever_ray.student import Rabtriever
from rabtriever_ray.teacher import GenerativeReranker

INT8 = dataclasses.replace(TINY_TEACHER, quantize="int8", quantize_check="warn")


@pytest.fixture(scope="module")
def int8_teacher():
    return GenerativeReranker.from_config(INT8, device="cpu")


def _inputs(tokens: int, width: int, seed: int) -> torch.Tensor:
    """Activations as LLMs have them: two outlier channels, and a first token with massive values."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, width, generator=generator)
    x[:, [3, 17]] *= 40.0
    x[0] *= 200.0
    return x


def _relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return float((y - reference).norm() / reference.norm())


def test_int8_linear_follows_fp32_where_per_tensor_int8_does_not():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    calibration, x = _inputs(256, 64, seed=1), _inputs(32, 64, seed=2)
    ranges = calibration.abs().amax(0)
    layer = precision.Int8Linear(linear, ranges, calibration.t() @ calibration)
    with torch.no_grad():
        reference = linear(x)
        # Without the first token, whose values are 200x the rest: the error of the ordinary rows.
        ours = _relative_error(layer(x)[1:], reference[1:])
        plain = torch.ao.nn.quantized.dynamic.Linear(64, 48, dtype=torch.qint8)
        plain.set_weight_bias(
            torch.quantize_per_channel(
                linear.weight,
                linear.weight.abs().amax(1).double() / 127,
                torch.zeros(48, dtype=torch.long),
                0,
                torch.qint8,
            ),
            linear.bias,
        )
        per_tensor = _relative_error(plain(x)[1:], reference[1:])
    assert ours < 0.02
    assert per_tensor > 10 * ours
    assert layer(x.to(torch.float32)).dtype == torch.float32


def test_gptq_rounding_lowers_the_output_error_on_the_calibration_inputs():
    generator = torch.Generator().manual_seed(0)
    # Correlated inputs: rounding errors in one column can be compensated by the next ones.
    x = torch.randn(512, 8, generator=generator) @ torch.randn(8, 32, generator=generator)
    weight = torch.randn(16, 32, generator=generator)
    scale = weight.abs().amax(1) / precision.WEIGHT_LEVELS
    nearest = torch.clamp(torch.round(weight / scale[:, None]), -63, 63) * scale[:, None]
    gptq = precision.gptq_round(weight, scale, x.t() @ x)
    grid = gptq / scale[:, None]
    assert torch.allclose(grid, grid.round(), atol=1e-3)  # on the same integer grid
    assert grid.abs().max() <= precision.WEIGHT_LEVELS + 1e-3
    assert _relative_error(x @ gptq.t(), x @ weight.t()) < 0.7 * _relative_error(
        x @ nearest.t(), x @ weight.t()
    )


def test_the_quantised_copy_shares_what_stays_fp32_and_leaves_the_model_alone(int8_teacher):
    model, low = int8_teacher.model, int8_teacher.low_model
    assert not any(isinstance(m, precision.Int8Linear) for m in model.modules())
    linears = [m for m in decoder_layers(low).modules() if isinstance(m, nn.Linear)]
    assert linears == []  # every linear of the blocks is int8
    assert low.lm_head.weight is model.lm_head.weight
    assert low.get_input_embeddings().weight is model.get_input_embeddings().weight
    assert low.model.norm.weight is model.model.norm.weight


def test_an_int8_teacher_scores_close_to_fp32_and_encodes_documents_exactly(int8_teacher):
    fp32 = GenerativeReranker.from_config(TINY_TEACHER, device="cpu")
    queries, documents = precision.calibration_texts(4, 6, seed=3)
    low = precision.sample_scores(lambda q, d: int8_teacher.score(q, d).score, queries, documents)
    reference = precision.sample_scores(lambda q, d: fp32.score(q, d).score, queries, documents)
    figures = precision.agreement(reference, low)
    assert figures["spearman"] > 0.95 and figures["pairs"] == 24
    assert 0 < figures["max_abs_diff"] < 0.05  # int8 really ran, and stayed close
    assert int8_teacher.precision["scheme"] == "int8"
    assert set(int8_teacher.precision["teacher"]) >= {"spearman", "top1", "max_abs_diff", "pairs"}
    # Documents stay fp32; the two precisions keep their own prefix caches.
    student, fp32_student = Rabtriever(int8_teacher), Rabtriever(fp32)
    assert torch.equal(student.encode_documents(documents), fp32_student.encode_documents(documents))
    h_low, h_fp32 = student.encode_queries(queries), fp32_student.encode_queries(queries)
    assert not torch.equal(h_low, h_fp32)
    assert torch.allclose(h_low, h_fp32, rtol=0.05, atol=0.05 * float(h_fp32.abs().max()))
    # The int8 query prefix is cached apart: an fp32 encoding on the same teacher (the agreement check's
    # reference) still equals the fp32 teacher's.
    assert int8_teacher.low_prefix_cache
    prompts = int8_teacher.prompts.query_prompts(queries)
    assert torch.equal(int8_teacher.encode(prompts, low_precision=False), fp32.encode(prompts))


def test_disagreement_is_refused_or_warned_and_recorded(monkeypatch, caplog, int8_teacher):
    monkeypatch.setitem(precision.THRESHOLDS, "spearman", 1.01)  # no int8 model can reach it
    with pytest.raises(precision.PrecisionError, match=r"teacher scores from int8 blocks disagree.*spearman"):
        GenerativeReranker.from_config(dataclasses.replace(INT8, quantize_check="refuse"), device="cpu")
    student = Rabtriever(int8_teacher)
    with caplog.at_level(logging.WARNING, logger="rabtriever_ray.precision"):
        figures = student.check_precision("warn")
    assert "student scores from int8 blocks disagree" in caplog.text
    assert student.precision["student"] == figures and student.precision["teacher"]
    with pytest.raises(precision.PrecisionError, match="student scores"):
        student.check_precision("refuse")


def test_int8_is_refused_off_cpu_and_the_options_are_checked():
    assert "runs on CPUs" in precision.int8_unavailable(torch.device("cuda"))
    assert precision.int8_unavailable(torch.device("cpu")) is None
    with pytest.raises(ConfigError, match="'quantize' must be one of 'none'|'int8'"):
        from_dict(TeacherConfig, {"quantize": "int4"})
    with pytest.raises(ConfigError, match="'quantize_check' must be one of"):
        from_dict(ServeConfig, {"quantize_check": "ignore"})
    with pytest.raises(ValueError, match="quantize must be one of"):
        GenerativeReranker.from_config(dataclasses.replace(TINY_TEACHER, quantize="int4"), device="cpu")


def test_a_checkpoint_served_and_evaluated_in_int8_records_its_agreement(tmp_path):
    from helpers import save_checkpoint, write_beir

    from rabtriever_ray.config import EvaluateConfig
    from rabtriever_ray.evaluate import run_evaluation
    from rabtriever_ray.serve.deployments import _teacher_config
    from rabtriever_ray.student import load_student, load_student_info

    checkpoint = save_checkpoint(tmp_path / "checkpoint")
    recorded = load_student_info(checkpoint)["teacher_config"]
    assert recorded.quantize == "none"  # a checkpoint records no precision: it is the loader's choice
    student = load_student(checkpoint, dataclasses.replace(recorded, quantize="int8", quantize_check="warn"))
    assert student.precision["scheme"] == "int8"
    assert student.precision["student"]["pairs"] == 120 and student.precision["teacher"]["pairs"] == 120
    served = _teacher_config(ServeConfig(checkpoint=str(checkpoint), quantize="int8"), checkpoint)
    assert (served.quantize, served.quantize_check, served.model) == ("int8", "refuse", recorded.model)
    assert _teacher_config(ServeConfig(checkpoint=str(checkpoint)), checkpoint).quantize == "none"

    results = run_evaluation(
        EvaluateConfig(
            data=str(write_beir(tmp_path / "skills")),
            split="test",
            methods=["teacher"],
            checkpoint=str(checkpoint),
            teacher=INT8,
        )
    )
    assert results["precision"]["student"]["scheme"] == "int8"
    assert results["precision"]["teacher"]["teacher"]["pairs"] == 120
