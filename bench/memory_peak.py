"""Predicted vs measured memory: weights, KV and the peak of a generation, per mask × batch × seq.

    python bench/memory_peak.py [--model smollm2] [--llama7b] [--out bench/results/FILE.json]

On CUDA it measures `torch.cuda.max_memory_allocated` over a whole generation (prefill and
decode) and compares it with `rap.core.memory.peak_bytes`; the activation formula is analytic (no
coefficient is fitted), so the grid below is disjoint from any fitting grid by construction.
`--llama7b` adds a Llama-2-7B-shaped model with random weights (bytes and time do not depend on
the values). On a CPU it checks the exact part (weights and KV against the tensors) and says
that peaks need a GPU. Prints one row per point and the mean and worst relative error.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from rap.core import memory
from rap.core.masks import KeepMask

GRID_BATCH = (1, 4, 16)
GRID_PROMPT = (96, 700, 1800)
NEW_TOKENS = 16


def masks_for(model_id: str, n: int) -> dict[str, KeepMask]:
    third = n // 3
    return {
        "dense": KeepMask.dense(model_id, n),
        "no-attn-1/3": KeepMask.from_drops(model_id, n, drop_attn=f"{third}-{2 * third - 1}"),
        "no-mlp-1/3": KeepMask.from_drops(model_id, n, drop_mlp=f"{third}-{2 * third - 1}"),
        "mixed": KeepMask.from_drops(model_id, n, drop_attn=f"0,{n - 3}-{n - 1}", drop_mlp="2-6"),
    }


def measure(model, mask: KeepMask, batch: int, prompt: int) -> dict:  # type: ignore[no-untyped-def]
    model.apply(mask)
    cfg, dt = model.config, model.dtype
    seq = prompt + NEW_TOKENS - 1
    predicted = memory.peak_bytes(cfg, mask, batch, seq, dt, prefill_tokens=prompt)
    ids = [[5 + (i % 1000) for i in range(prompt)]] * batch
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    out = model.generate_ids(ids, NEW_TOKENS, stop_at_eos=False)
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated()
    assert out.kv_bytes == memory.kv_bytes(cfg, mask, batch, seq, dt)
    return {
        "batch": batch,
        "prompt": prompt,
        "predicted": predicted,
        "measured": measured,
        "error": (predicted - measured) / measured,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--llama7b", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import rap

    if not torch.cuda.is_available():
        model = rap.load_model(args.model, device="cpu")
        for name, mask in masks_for(model.model_id, model.num_layers).items():
            model.apply(mask)
            exact = model.weight_bytes() == model.predicted_weight_bytes()
            print(f"{name:12s} weights exact: {exact}")
        print("peak vs max_memory_allocated needs CUDA: run this on a GPU machine")
        return 0
    models = [rap.load_model(args.model, device="cuda", dtype="float16")]
    if args.llama7b:
        from gpu.common import random_llama  # bench/gpu/common.py: the one 7B-shaped model

        models.append(random_llama(toy=False, dtype=torch.float16))
    rows = []
    for model in models:
        for name, mask in masks_for(model.model_id, model.num_layers).items():
            for batch in GRID_BATCH:
                for prompt in GRID_PROMPT:
                    row = {
                        "model": model.model_id,
                        "mask": name,
                        **measure(model, mask, batch, prompt),
                    }
                    rows.append(row)
                    print(
                        f"{row['model'][:24]:24s} {name:12s} B={batch:<3d} P={prompt:<5d} "
                        f"predicted {row['predicted'] / 2**20:9.1f} MiB  measured "
                        f"{row['measured'] / 2**20:9.1f} MiB  error {row['error']:+.2%}"
                    )
        model.apply(model.dense_mask())
        del model
        torch.cuda.empty_cache()
    errors = [abs(r["error"]) for r in rows]
    mean, worst = statistics.mean(errors), max(errors)
    print(f"mean |error| {mean:.2%}, worst {worst:.2%} over {len(rows)} points")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
