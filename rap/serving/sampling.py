"""The next token from rows' logits: greedy, or sampled with each row's own settings."""

from __future__ import annotations

import torch

from rap.serving.rows import Row


def sample(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> int:
    """Greedy at temperature 0; else sampled from softmax(logits / T) within the top-p mass."""
    if temperature <= 0:
        return int(logits.argmax())
    if generator is not None and generator.device != logits.device:
        # A row's generator lives on the CPU (seeded per request); the logits on a GPU move
        # to it, 4 bytes a vocabulary entry, rather than the draw failing on mixed devices.
        logits = logits.to(generator.device)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter(0, idx[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def greedy_many(logits: list[torch.Tensor]) -> list[int]:
    """Greedy tokens of several rows in one argmax and one device→host copy (per-row `.item()`
    calls would each wait for the device: on a GPU at batch 32 that is 32 round trips a step)."""
    if not logits:
        return []
    return [int(t) for t in torch.stack(logits).argmax(dim=-1).tolist()]


def pick_tokens(wanted: list[tuple[Row, torch.Tensor]]) -> list[tuple[Row, int]]:
    """Each row's next token from its logits: greedy rows together (`greedy_many`), sampled
    rows with their own generator; in the rows' order."""
    greedy = [(row, lg) for row, lg in wanted if row.request.temperature <= 0]
    tokens = greedy_many([lg for _, lg in greedy])
    picked = {row.id: t for (row, _), t in zip(greedy, tokens, strict=True)}
    return [
        (row, picked[row.id])
        if row.id in picked
        else (row, sample(lg, row.request.temperature, row.request.top_p, row.generator))
        for row, lg in wanted
    ]
