"""Tiny seeded random models of every supported decoder family, with locally built tokenizers (no downloads).

Each family gets 2 layers, hidden 64 and a tokenizer of its style: byte-level BPE (Llama 3, Qwen, Gemma, Granite,
GPT-2, ...) or SentencePiece-style BPE with a Metaspace pre-tokenizer that prepends "▁" (Mistral <= v0.3, Phi-3,
Llama 2), each with a chat template of the family's shape. Sliding-window families get a window of 8 tokens, so
test documents are longer than the window; post-processing constants are set large enough to change scores.
"""

from __future__ import annotations

import string

import torch

WINDOW = 8

_CORPUS = """\
Document: a support strategy that restates what the seeker said in other words.
Query: I failed my exam and I feel terrible about it. Is this document relevant? Answer yes or no.
Seeker: my friend stopped talking to me and I do not know why.
Supporter: that sounds really hard, how long has it been?
The claim says that the protein binds to the receptor and the abstract supports or refutes the claim.
Question, Restatement or Paraphrasing, Reflection of feelings, Self-disclosure, Affirmation and Reassurance,
Providing Suggestions, Information, Others. Robot skills: pick up the cup, open the drawer, wipe the table.
"""

# Chat templates of each family's shape (what matters here: special tokens, where the generation prompt ends).
TEMPLATES = {
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # Qwen3: with enable_thinking false the template writes an empty thinking block after the header.
    "qwen3": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
        "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
        "{% endif %}"
    ),
    # Reasoning templates that always open the thinking block themselves.
    "think_open": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ '<|begin_of_text|>' }}{% for m in messages %}"
        "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "gemma": (
        "{{ '<bos>' }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else 'user' %}"
        "{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ '<s>' }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
        "{% else %}{{ m['content'] + '</s>' }}{% endif %}{% endfor %}"
    ),
    "phi3": (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
}
_SPECIALS = {
    "chatml": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "qwen3": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
    "think_open": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
    "llama3": [
        "<|end_of_text|>",
        "<|begin_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ],
    "gemma": ["<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"],
    "mistral": ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
    "phi3": ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|endoftext|>"],
    "plain": ["<|endoftext|>"],
}
# (pad, bos, eos) of each style.
_ROLES = {
    "chatml": ("<|endoftext|>", None, "<|im_end|>"),
    "qwen3": ("<|endoftext|>", None, "<|im_end|>"),
    "think_open": ("<|endoftext|>", None, "<|im_end|>"),
    "llama3": ("<|end_of_text|>", "<|begin_of_text|>", "<|eot_id|>"),
    "gemma": ("<pad>", "<bos>", "<end_of_turn>"),
    "mistral": ("<unk>", "<s>", "</s>"),
    "phi3": ("<|endoftext|>", "<s>", "<|end|>"),
    "plain": ("<|endoftext|>", "<|endoftext|>", "<|endoftext|>"),
}
SENTENCEPIECE_STYLES = {"mistral", "phi3"}


def build_tokenizer(style: str, vocab_size: int = 512):
    """A seeded BPE tokenizer with the special tokens and chat template of ``style`` (``plain``: no template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = _SPECIALS[style]
    if style in SENTENCEPIECE_STYLES:
        bpe = Tokenizer(models.BPE(unk_token="<unk>"))
        # Newlines stay pieces of their own, as SentencePiece's byte pieces do.
        bpe.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split("\n", behavior="isolated"),
                pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
            ]
        )
        bpe.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = sorted(set(string.printable) - set(string.whitespace) | {"▁", "\n", "\t"})
    else:
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    # Repeat the answer words so the trainer merges them into single tokens, with and without a leading space.
    bpe.train_from_iterator([_CORPUS] + ["yes\nno\n yes no\nyes no yes\n"] * 20, trainer=trainer)
    pad, bos, eos = _ROLES[style]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos, eos_token=eos, pad_token=pad)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [t for t in specials if t not in (pad, bos, eos)]}
    )
    if style != "plain":
        tokenizer.chat_template = TEMPLATES[style]
    return tokenizer


def _config(family: str, vocab: int, tokenizer):
    import transformers as T

    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    ids["bos_token_id"] = tokenizer.bos_token_id
    llama_like = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        **ids,
    )
    gpt_like = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, **ids)
    sliding = ["sliding_attention", "full_attention"]
    configs = {
        "llama": lambda: T.LlamaConfig(**llama_like),
        "mistral": lambda: T.MistralConfig(**llama_like, sliding_window=WINDOW),
        "qwen2": lambda: T.Qwen2Config(
            **llama_like, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1
        ),
        "qwen3": lambda: T.Qwen3Config(**llama_like, head_dim=16),
        "gemma": lambda: T.GemmaConfig(**llama_like, head_dim=16),
        "gemma2": lambda: T.Gemma2Config(
            **llama_like, head_dim=16, sliding_window=WINDOW, final_logit_softcapping=0.5
        ),
        "gemma3_text": lambda: T.Gemma3TextConfig(
            **llama_like, head_dim=16, sliding_window=WINDOW, layer_types=sliding, final_logit_softcapping=0.5
        ),
        "gemma3": lambda: T.Gemma3Config(
            text_config=dict(
                llama_like,
                head_dim=16,
                sliding_window=WINDOW,
                layer_types=sliding,
                final_logit_softcapping=0.5,
            ),
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=28,
                patch_size=14,
            ),
            mm_tokens_per_image=4,
            **ids,
        ),
        "phi3": lambda: T.Phi3Config(**llama_like, sliding_window=WINDOW),
        "phi": lambda: T.PhiConfig(**gpt_like, intermediate_size=128),
        "granite": lambda: T.GraniteConfig(**llama_like, logits_scaling=0.25),
        "cohere": lambda: T.CohereConfig(**llama_like, logit_scale=4.0),
        "opt": lambda: T.OPTConfig(**gpt_like, ffn_dim=128, word_embed_proj_dim=64),
        "gpt2": lambda: T.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, **ids),
        "gpt_neox": lambda: T.GPTNeoXConfig(**gpt_like, intermediate_size=128),
    }
    return configs[family]()


# family -> tokenizer style. Together: every model type in families.SUPPORTED.
FAMILIES = {
    "llama": "llama3",
    "mistral": "mistral",
    "qwen2": "chatml",
    "qwen3": "qwen3",
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3_text": "gemma",
    "gemma3": "gemma",
    "phi3": "phi3",
    "phi": "plain",
    "granite": "chatml",
    "cohere": "chatml",
    "opt": "plain",
    "gpt2": "plain",
    "gpt_neox": "plain",
}
# Families whose output is post-processed after the LM head (soft-cap or scaling).
POSTPROCESSED = {"gemma2", "gemma3_text", "granite", "cohere"}
SLIDING = {"mistral", "qwen2", "gemma2", "gemma3_text", "gemma3", "phi3"}


def build_family(family: str, seed: int = 0):
    """``(model, tokenizer)``: the seeded tiny random model of ``family`` in eval mode, fp32 on CPU."""
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer(FAMILIES[family])
    config = _config(family, len(tokenizer), tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.eval(), tokenizer
