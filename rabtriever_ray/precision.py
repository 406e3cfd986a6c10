"""Low-precision inference on CPUs: int8 decoder layers, with their agreement against fp32 measured and enforced.

Scheme ``int8`` (`quantized_copy`): every linear layer inside the decoder blocks becomes an `Int8Linear` that runs
fbgemm's dynamic int8 matrix product (``torch.ops.quantized.linear_dynamic``, the x86 kernels PyTorch ships),
with three exact rescalings around it, each calibrated on fp32 activations:

- SmoothQuant factors per input channel (alpha 0.5) move the activations' range into the weights;
- the few input channels with the largest activations (2%) run in fp32 beside the int8 product (LLM.int8's
  decomposition): LLMs' outlier channels would otherwise set every token's step;
- each token is divided by its largest entry before the product and multiplied back after it: one token with
  massive activations (the first of a prompt) no longer coarsens the others.

Weights are int8 per output channel in the 7-bit range: on CPUs without VNNI, the u8 x s8 pair sums of AVX2 then
never saturate, so activations keep their 8 bits. The embeddings, the final norm and the LM head are shared with
the fp32 model and stay fp32: the yes/no score is a difference of fp32 logits.

Agreement is part of the scheme: `GenerativeReranker` measures its int8 pair scores, and `Rabtriever` its int8
query scores, against fp32 on a seeded sample of the bundled demo texts when it is built (`agreement`), keeps the
figures in ``precision`` and refuses (or, with ``quantize_check: warn``, warns) below `THRESHOLDS`.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .families import decoder_layers
from .metrics import agreement as run_agreement

logger = logging.getLogger(__name__)

SCHEMES = ("none", "int8")
# Pooled Spearman of scores and the share of queries whose best document stays the same, against fp32.
THRESHOLDS = {"spearman": 0.99, "top1": 0.97}
SMOOTH_ALPHA = 0.5
OUTLIER_SHARE = 0.02
WEIGHT_LEVELS = 63  # 7-bit weights: u8 x s8 pair sums stay within int16 on AVX2 (vpmaddubsw)
_DEMO = Path(__file__).parent / "demo_data"


class PrecisionError(RuntimeError):
    """Low-precision inference is unavailable here, or disagrees with fp32 beyond the thresholds."""


def cpu_flags() -> dict:
    """The CPU features int8 speed depends on (from ``/proc/cpuinfo`` where there is one), and the vector
    extension PyTorch's kernels picked."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        **{name: name in flags for name in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")},
    }


def int8_unavailable(device: torch.device) -> str | None:
    """Why scheme ``int8`` cannot run on ``device`` (None when it can)."""
    if device.type != "cpu":
        return f"int8 inference runs on CPUs; on {device.type} keep the default precision (dtype: auto)"
    engines = torch.backends.quantized.supported_engines
    if not {"x86", "fbgemm"} & set(engines):
        return f"int8 inference needs PyTorch's x86/fbgemm kernels; this build has {engines}"
    return None


class Int8Linear(nn.Module):
    """A frozen ``nn.Linear`` as a dynamic int8 product (see the module docstring). ``input_range`` is the
    largest absolute value each input channel took on the calibration sample."""

    def __init__(self, linear: nn.Linear, input_range: torch.Tensor, gram: torch.Tensor | None = None):
        super().__init__()
        weight = linear.weight.detach().float()
        input_range = input_range.float().clamp(min=1e-5)
        count = max(1, round(OUTLIER_SHARE * weight.shape[1]))
        outliers = input_range.topk(count).indices.sort().values
        keep = torch.ones(weight.shape[1])
        keep[outliers] = 0.0
        self.register_buffer("outliers", outliers)
        self.register_buffer("outlier_weight", weight[:, outliers].t().contiguous())
        # The smoothed product sees the other channels only; their range sets the factors.
        inliers = input_range * keep + (1 - keep) * input_range[keep.bool()].max()
        smooth = inliers.pow(SMOOTH_ALPHA) / weight.abs().amax(0).clamp(min=1e-5).pow(1 - SMOOTH_ALPHA)
        self.register_buffer("input_scale", keep / smooth)  # zero on the outlier channels
        weight = weight * smooth[None, :] * keep[None, :]
        scale = weight.abs().amax(1).clamp(min=1e-8) / WEIGHT_LEVELS
        if gram is not None:  # the product's own inputs: x * input_scale
            scaled = self.input_scale
            weight = gptq_round(weight, scale, gram * scaled[:, None] * scaled[None, :])
        scale = scale.double()
        with warnings.catch_warnings():
            # fbgemm's prepack takes a quantized tensor, whose creation functions PyTorch has deprecated; the
            # kernels are still the x86 ones `torch.ao` dynamic quantisation runs.
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            quantized = torch.quantize_per_channel(
                weight, scale, torch.zeros(len(scale), dtype=torch.long), 0, torch.qint8
            )
        self._packed = torch.ops.quantized.linear_prepack(quantized, None)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x = x.reshape(-1, shape[-1]).float()  # 2-D: fewer, cheaper calls for a few dozen tokens
        outlier_part = torch.mm(torch.index_select(x, 1, self.outliers), self.outlier_weight)
        x = x * self.input_scale
        peak = x.abs().amax(1, keepdim=True).clamp_(min=1e-6)
        y = torch.ops.quantized.linear_dynamic(x.mul_(peak.reciprocal()), self._packed, False)
        y = torch.addcmul(outlier_part, y, peak)
        if self.bias is not None:
            y += self.bias
        return y.reshape(*shape[:-1], y.shape[-1]).to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def gptq_round(
    weight: torch.Tensor, scale: torch.Tensor, gram: torch.Tensor, block: int = 128
) -> torch.Tensor:
    """``weight`` ``[out, in]`` rounded onto the integer grid ``scale`` (per output channel) column by column,
    each column's rounding error pushed onto the columns not yet rounded through the inverse of the inputs'
    Gram matrix ``gram`` (GPTQ, Frantar et al. 2022): the product's output error on the calibration inputs,
    not the weights' own, is what the rounding minimises. Returns the rounded weight (in float)."""
    weight = weight.clone()
    gram = gram.double().clone()
    dead = torch.diag(gram) == 0
    gram[dead, dead] = 1.0
    weight[:, dead] = 0.0
    gram += 0.01 * torch.diag(gram).mean() * torch.eye(len(gram), dtype=gram.dtype)
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(gram)), upper=True).float()
    levels = WEIGHT_LEVELS
    for start in range(0, weight.shape[1], block):
        end = min(start + block, weight.shape[1])
        columns = weight[:, start:end].clone()
        errors = torch.zeros_like(columns)
        local = inverse[start:end, start:end]
        for i in range(end - start):
            column = columns[:, i]
            rounded = torch.clamp(torch.round(column / scale), -levels, levels) * scale
            error = (column - rounded) / local[i, i]
            columns[:, i:] -= error[:, None] * local[i, i:][None, :]
            columns[:, i] = rounded
            errors[:, i] = error
        weight[:, start:end] = columns
        weight[:, end:] -= errors @ inverse[start:end, end:]
    return weight


def input_statistics(
    model: nn.Module, run: Callable[[], object]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Largest absolute input per channel, and the inputs' Gram matrix ``X^T X``, of every linear layer in the
    decoder blocks while ``run()`` runs the model (fp32), by the layer's name inside `families.decoder_layers`."""
    ranges: dict[str, torch.Tensor] = {}
    grams: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in decoder_layers(model).named_modules():
        if isinstance(module, nn.Linear):

            def record(_module, args, name=name):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                peak = x.abs().amax(0)
                ranges[name] = torch.maximum(ranges[name], peak) if name in ranges else peak
                gram = x.t() @ x
                grams[name] = grams[name] + gram if name in grams else gram

            hooks.append(module.register_forward_pre_hook(record))
    try:
        with torch.inference_mode():
            run()
    finally:
        for hook in hooks:
            hook.remove()
    return ranges, grams


def quantized_copy(
    model: nn.Module, ranges: dict[str, torch.Tensor], grams: dict[str, torch.Tensor] | None = None
) -> nn.Module:
    """``model`` with the linear layers of its decoder blocks as `Int8Linear`; every other weight (embeddings,
    norms, LM head) is shared with ``model``, which is left unchanged."""
    low = shared_copy(model)
    layers = decoder_layers(low)
    for name, module in list(layers.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear):
                if full not in ranges:
                    raise PrecisionError(f"calibration saw no input of {full}; cannot quantise it")
                setattr(module, child_name, Int8Linear(child, ranges[full], (grams or {}).get(full)))
    return low.eval()


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules that shares every parameter and buffer with it: replacing a submodule of the
    copy leaves ``model`` as it is, and costs no memory for what is not replaced."""
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo=shared)


def calibration_samples() -> tuple[tuple[list[str], list[str]], tuple[list[str], list[str]]]:
    """``(calibration, agreement)``, each ``(queries, documents)`` of demo texts: 16 queries x 4 skills for the
    activation statistics, and 12 other queries x 10 other skills for the load-time agreement check."""
    queries, documents = calibration_texts(28, 14, seed=0)
    return (queries[:16], documents[:4]), (queries[16:], documents[4:])


def calibration_texts(queries: int, documents: int, seed: int) -> tuple[list[str], list[str]]:
    """A seeded sample of the bundled demo's instructions and skill descriptions: text a prompt template wraps
    like any user's, for activation ranges and agreement checks."""
    rng = random.Random(seed)
    texts = [json.loads(line)["text"] for line in (_DEMO / "queries.jsonl").read_text().splitlines() if line]
    docs = [json.loads(line)["text"] for line in (_DEMO / "corpus.jsonl").read_text().splitlines() if line]
    return rng.sample(texts, queries), rng.sample(docs, documents)


def agreement(reference: torch.Tensor, low: torch.Tensor) -> dict[str, float | int]:
    """Figures of ``low`` against ``reference`` scores, both ``[queries, documents]``: pooled Spearman, mean
    per-query Spearman, top-1 agreement and the largest absolute difference."""

    def run(scores: torch.Tensor) -> dict[str, dict[str, float]]:
        return {
            str(q): {str(d): float(s) for d, s in enumerate(row)} for q, row in enumerate(scores.tolist())
        }

    figures = run_agreement(run(low), run(reference))
    return {
        **{k: round(float(v), 4) for k, v in figures.items() if k != "pairs"},
        "max_abs_diff": round(float((low - reference).abs().max()), 4),
        "queries": int(reference.shape[0]),
        "pairs": int(figures["pairs"]),
    }


def enforce(figures: dict, what: str, check: str) -> None:
    """Refuse (``check="refuse"``) or warn (``"warn"``) when ``figures`` fall below `THRESHOLDS`."""
    below = [
        f"{name} {figures[name]:.4f} < {limit}"
        for name, limit in THRESHOLDS.items()
        if not (np.isfinite(figures[name]) and figures[name] >= limit)
    ]
    if not below:
        logger.info("int8 %s agrees with fp32: %s", what, figures)
        return
    message = (
        f"{what} from int8 blocks disagree with fp32 on the calibration sample ({', '.join(below)}; "
        f"max |score diff| {figures['max_abs_diff']:.3f} over {figures['pairs']} pairs): keep quantize: none "
        "for this model, or set quantize_check: warn to serve it anyway"
    )
    if check == "refuse":
        raise PrecisionError(message)
    logger.warning(message)


def sample_scores(score: Callable[[Sequence[str], Sequence[str]], torch.Tensor], queries, documents):
    """``[len(queries), len(documents)]`` scores of every pair, query-major, from ``score(queries, documents)``
    over aligned lists."""
    q = [text for text in queries for _ in documents]
    d = [text for _ in queries for text in documents]
    return score(q, d).view(len(queries), len(documents))
