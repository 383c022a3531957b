"""Random-weight models built from a preset config, with no weight file: `random:<preset>`.

`rap.core.loading.load_model("random:llama-7b")` builds Llama-2-7B's shape directly on the
target device in the serving dtype (no float32 copy, no 13 GB of CPU initialisation), so that
the real app can serve a 7B-shaped model on a GPU whose machine carries no weights (the GPU run:
bytes and time do not depend on the values). Dropped blocks come back from their host copies
(pinned on a GPU, a clone on a CPU): there is no file to re-read (`BlockStore` with no source).

The tokenizer is `ByteTokenizer`: UTF-8 bytes as ids, needing no file and no package (the GPU
machine's first call has neither the default model's package nor its converted cache). The text
a random model generates is meaningless; its tokens are what serving benchmarks count.
"""

from __future__ import annotations

from typing import Any

from rap.core.errors import ModelNotFoundError

PREFIX = "random:"
PRESETS: dict[str, dict[str, int]] = {
    # Llama-2-7B's shape (also bench/gpu's): 6.74 B parameters, 12.55 GiB in fp16.
    "llama-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
    # Tiny, for the CPU dry run and the tests: same architecture, same code paths.
    "toy": dict(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=4096,
    ),
}
SPECIALS = {"<pad>": 0, "<s>": 1, "</s>": 2}
BYTE_OFFSET = 3
"""Byte b is id b + 3 (0, 1, 2 are pad, bos and eos, as in LlamaConfig's defaults)."""


def is_random(name: str) -> bool:
    return name.startswith(PREFIX)


def preset(name: str) -> dict[str, int]:
    """The preset's config values, or a `ModelNotFoundError` naming the known presets."""
    key = name.removeprefix(PREFIX)
    if key not in PRESETS:
        known = ", ".join(PREFIX + k for k in PRESETS)
        raise ModelNotFoundError(
            f"unknown random-model preset {name!r}",
            expected=f"one of {known}",
            fix="add the preset to rap.core.random_models.PRESETS, or name a model folder",
        )
    return PRESETS[key]


def random_config(name: str) -> tuple[Any, str]:
    """The transformers config of a preset and the model's identity (its name, `random:...`)."""
    from transformers import LlamaConfig  # lazy: heavy (transformers)

    values: dict[str, Any] = dict(preset(name))  # Any: LlamaConfig types each keyword
    config = LlamaConfig(**values, initializer_range=0.02, bos_token_id=1, eos_token_id=2)
    config.name_or_path = name
    return config, name


def build_random(name: str, dtype: str, device: str, seed: int = 0) -> Any:
    """A `PrunableModel` of the preset with random normal weights (std 0.02, seeded), built
    on `device` in `dtype` directly: on a GPU the 7B shape takes a few seconds, not the
    minutes and 27 GB of a float32 CPU initialisation."""
    import torch  # lazy: heavy (torch)
    from transformers import LlamaForCausalLM  # lazy: heavy (transformers)

    from rap.core.model import PrunableModel  # lazy: heavy (torch, transformers)

    config, model_id = random_config(name)
    before = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        torch.manual_seed(seed)
        with torch.device(device):
            hf = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(before)
    return PrunableModel(hf, model_id, None, ByteTokenizer(), device)


class ByteTokenizer:
    """UTF-8 bytes as token ids, with a plain-text chat template: the part of a transformers
    tokenizer that serving uses (`PrunableModel.encode`/`decode`, `Intake`), from no file.
    Ids beyond the bytes (a random model's vocabulary is larger) decode as the byte they
    equal modulo 256, so every generated token decodes to at most one character."""

    chat_template = "byte-level: <|role|> content lines"
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [b + BYTE_OFFSET for b in text.encode("utf-8")]
        return {"input_ids": [self.bos_token_id, *ids] if add_special_tokens else ids}

    def apply_chat_template(
        self,
        messages: list[dict[str, str]],
        tokenize: bool = False,
        add_generation_prompt: bool = True,
    ) -> Any:
        text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
        if add_generation_prompt:
            text += "<|assistant|>\n"
        return self(text, add_special_tokens=False)["input_ids"] if tokenize else text

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        data = bytes(
            (i - BYTE_OFFSET) % 256 for i in ids if not (skip_special_tokens and i < BYTE_OFFSET)
        )
        return data.decode("utf-8", errors="replace")

    def get_vocab(self) -> dict[str, int]:
        """Each byte spelled as one character (latin-1), as byte-level vocabularies do."""
        return {**SPECIALS, **{bytes([b]).decode("latin-1"): b + BYTE_OFFSET for b in range(256)}}
