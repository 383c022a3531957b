"""Tiny random models of every supported architecture, built from configs (no download)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers as tf

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2")
SLIDING = ("mistral", "qwen2", "gemma2", "gemma3", "phi3")
WINDOW = 5

_COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.2,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_config(arch: str) -> tf.PretrainedConfig:
    """A 4-layer config (6 for Gemma 3) of `arch` with sliding windows of 5 where it has them."""
    if arch == "llama":
        return tf.LlamaConfig(**_COMMON, head_dim=16, attention_bias=True)
    if arch == "mistral":
        return tf.MistralConfig(**_COMMON, head_dim=16, sliding_window=WINDOW)
    if arch == "qwen2":
        return tf.Qwen2Config(
            **_COMMON, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2
        )
    if arch == "qwen3":
        return tf.Qwen3Config(**_COMMON, head_dim=16)
    if arch == "gemma2":
        return tf.Gemma2Config(**_COMMON, head_dim=16, sliding_window=WINDOW)
    if arch == "gemma3":
        types = ["sliding_attention", "full_attention"] * 3
        return tf.Gemma3TextConfig(
            **{**_COMMON, "num_hidden_layers": 6},
            head_dim=16,
            sliding_window=WINDOW,
            layer_types=types,
        )
    if arch == "phi3":
        return tf.Phi3Config(**_COMMON, sliding_window=WINDOW)
    if arch == "gpt2":
        return tf.GPT2Config(
            vocab_size=96,
            n_embd=64,
            n_layer=4,
            n_head=4,
            n_positions=256,
            initializer_range=0.2,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    raise ValueError(arch)


def save_tiny(arch: str, folder: Path, seed: int = 0) -> Path:
    """Build a random `arch` model and save it as safetensors into `folder`."""
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    model.save_pretrained(folder)
    return folder


def save_big_llama(folder: Path) -> Path:
    """Two layers whose blocks are ≥ 16 MiB in float32 (attention 16 MiB, MLP 48 MiB)."""
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=64,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=64,
    )
    tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    return folder


CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant {% endif %}"
)


def save_tokenizer(folder: Path, vocab_size: int = 96) -> None:
    """A word-level tokenizer over words w3..w{V-1} (0 pad, 1 <s>, 2 </s>), with a chat
    template, so tiny models can serve text like real ones."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, vocab_size)})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)


def words(*ids: int) -> str:
    return " ".join(f"w{i}" for i in ids)


class FnPlanner:
    """A `MaskPlanner` from a function of (budget, batch, seq[, prefill]), for tests."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def plan(self, budget_bytes: int, batch: int, seq: int, prefill_tokens: int | None = None):  # type: ignore[no-untyped-def]
        return self.fn(budget_bytes, batch, seq)

    def describe(self) -> dict[str, Any]:
        return {"kind": "FnPlanner"}

    def quality_cost(self, mask: Any) -> float | None:
        return None
