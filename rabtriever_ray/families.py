"""The decoder families rabtriever-ray supports, and how each turns a hidden state into its own logits.

Teacher and student read the final-layer hidden state at the answer position *before* the final norm, and score it
with the model's own output head (`scoring.YesNoHead`). That is exact only if the head does everything the model
does after its last decoder layer. Across families three things differ:

- where the final norm lives (``norm``, ``final_layernorm``, ``final_layer_norm``, ``ln_f`` on the decoder);
- what happens to the LM head's output: Gemma 2 and 3 soft-cap it (``tanh(logits / c) * c`` with
  ``final_logit_softcapping``), Cohere multiplies it by ``logit_scale``, Granite divides it by ``logits_scaling``;
- the attention layout: sliding-window layers (Mistral, Qwen2 with ``use_sliding_window``, Gemma 2/3, Phi-3) and
  layers without a plain key/value cache (state-space or linear-attention hybrids), which decide whether a prompt
  prefix's keys and values can be computed once and shared (`prefix_sharing_blocker`).

`SUPPORTED` lists the model types whose scoring is tested (``tests/test_families.py``: tiny seeded random configs
of each). Any other model type is refused at load with `UnsupportedModelError`, and `scoring.check_output_head` compares
the head with the model's own logits on a short sequence whenever a model is loaded, so a family whose output
processing changes upstream fails loudly instead of scoring wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# model_type -> what users know it as. Each has a tiny random config in tests/test_families.py.
SUPPORTED: dict[str, str] = {
    "llama": "Llama 2, Llama 3.x, SmolLM2, TinyLlama",
    "mistral": "Mistral (sliding window)",
    "qwen2": "Qwen2, Qwen2.5 (optional sliding window)",
    "qwen3": "Qwen3 (thinking chat template)",
    "gemma": "Gemma",
    "gemma2": "Gemma 2 (sliding window, soft-capped logits)",
    "gemma3_text": "Gemma 3 text-only checkpoints (1B; sliding window)",
    "gemma3": "Gemma 3 multimodal checkpoints (4B and up), used on text",
    "phi3": "Phi-3, Phi-3.5, Phi-4-mini (SentencePiece-style tokenizers for Phi-3)",
    "phi": "Phi-1.5, Phi-2",
    "granite": "Granite 3 (scaled logits)",
    "cohere": "Cohere Command R (scaled logits)",
    "opt": "OPT",
    "gpt2": "GPT-2",
    "gpt_neox": "GPT-NeoX, Pythia",
}

_NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f")
# Layer types whose cache is plain keys and values; anything else (mamba, linear attention, ...) is not.
_KV_LAYER_TYPES = {"full_attention", "sliding_attention"}


class UnsupportedModelError(ValueError):
    """A model whose type is not in `SUPPORTED`, or whose output head this project cannot reproduce."""


def supported_list() -> str:
    return ", ".join(f"{t} ({d})" for t, d in SUPPORTED.items())


def text_config(config):
    """The language model's config (the ``text_config`` of a multimodal checkpoint, else ``config`` itself)."""
    get = getattr(config, "get_text_config", None)
    return get() if get is not None else config


def check_supported(model: nn.Module) -> str:
    """``model``'s ``model_type`` when it is supported, else `UnsupportedModelError` naming it and the list."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED:
        raise UnsupportedModelError(
            f"model type {model_type!r} ({type(model).__name__}) is not supported; supported model types: "
            f"{supported_list()}"
        )
    if model_type == "opt":
        cfg = model.config
        if not cfg.do_layer_norm_before or cfg.word_embed_proj_dim != cfg.hidden_size:
            raise UnsupportedModelError(
                f"OPT checkpoints without a final layer norm or with a projection after it (as OPT-350m) are not "
                f"supported ({type(model).__name__}: do_layer_norm_before={cfg.do_layer_norm_before}, "
                f"word_embed_proj_dim={cfg.word_embed_proj_dim}, hidden_size={cfg.hidden_size})"
            )
    return model_type


def backbone(model: nn.Module) -> nn.Module:
    """The decoder stack without the LM head (for a multimodal checkpoint, its language model)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    # transformers 4.x returns the model itself for GPT-2 and GPT-NeoX, whose stack is ``base_model``.
    return decoder if decoder is not None and decoder is not model else model.base_model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's blocks, bottom first (``layers``, ``h`` or ``blocks``: the list of ``num_hidden_layers``)."""
    decoder = backbone(model)
    count = text_config(model.config).num_hidden_layers
    for child in decoder.children():
        if isinstance(child, nn.ModuleList) and len(child) == count:
            return child
    raise UnsupportedModelError(
        f"cannot find the {count} decoder layers of {type(model).__name__} (no ModuleList of that length on "
        f"{type(decoder).__name__})"
    )


def final_norm(model: nn.Module) -> nn.Module:
    """The norm the model applies after its last decoder layer."""
    decoder = backbone(model)
    for name in _NORM_NAMES:
        norm = getattr(decoder, name, None)
        if isinstance(norm, nn.Module):
            return norm
    raise UnsupportedModelError(
        f"cannot find the final norm of {type(model).__name__} (looked for {', '.join(_NORM_NAMES)} on "
        f"{type(decoder).__name__}); supported model types: {supported_list()}"
    )


@dataclass(frozen=True)
class LogitTransform:
    """What a family does to ``lm_head(final_norm(h))``: ``logits * multiplier``, then ``tanh(x / cap) * cap``."""

    multiplier: float = 1.0
    softcap: float | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.multiplier != 1.0:
            logits = logits * self.multiplier
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def logit_transform(model: nn.Module) -> LogitTransform:
    """The family's post-processing of the LM head's output (identity for most families)."""
    model_type = model.config.model_type
    config = text_config(model.config)
    if model_type in ("gemma2", "gemma3_text"):
        return LogitTransform(softcap=getattr(config, "final_logit_softcapping", None))
    if model_type == "gemma3":  # the multimodal class does not soft-cap (released Gemma 3 configs set no cap)
        return LogitTransform(softcap=getattr(model.config, "final_logit_softcapping", None))
    if model_type == "cohere":
        return LogitTransform(multiplier=float(config.logit_scale))
    if model_type == "granite":
        return LogitTransform(multiplier=1.0 / float(config.logits_scaling))
    return LogitTransform()


def sliding_window(model: nn.Module) -> int | None:
    """The attention window of the model's sliding-window layers, None when every layer attends to all tokens."""
    config = text_config(model.config)
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if layer_types is not None:
        return window if "sliding_attention" in layer_types else None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return window


def prefix_sharing_blocker(model: nn.Module) -> str | None:
    """Why a prompt prefix's keys and values cannot be computed once and reused for this model (None: they can).

    Sliding-window layers are fine: the prefix's cache keeps every key and value (not only the window) and the
    model's own sliding mask picks what each tail token sees. Layers whose cache is a recurrent state are not.
    """
    layer_types = getattr(text_config(model.config), "layer_types", None) or []
    other = sorted(set(layer_types) - _KV_LAYER_TYPES)
    if other:
        return (
            f"model type {model.config.model_type!r} has layers of type {', '.join(other)} whose cache is not plain "
            "keys and values"
        )
    return None
