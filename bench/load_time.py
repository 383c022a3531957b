"""Time to load the default model: the one-off GGUF conversion, then loads from the cache.

    python bench/load_time.py [--fresh]

`--fresh` converts into a new temporary cache first (about 20 s on 2 CPU cores). Prints seconds.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fresh", action="store_true", help="convert into an empty cache first")
    args = ap.parse_args()
    if args.fresh:
        os.environ["RAP_CACHE_DIR"] = tempfile.mkdtemp(prefix="rap-cache-")
    import rap

    t0 = time.perf_counter()
    rap.load_model("smollm2", device="cpu")
    first = time.perf_counter() - t0
    later = []
    for _ in range(3):
        t0 = time.perf_counter()
        rap.load_model("smollm2", device="cpu")
        later.append(time.perf_counter() - t0)
    print(
        f"first load {first:.2f} s ({'with conversion' if args.fresh else 'cached'}); "
        f"later loads {', '.join(f'{t:.2f}' for t in later)} s"
    )


if __name__ == "__main__":
    main()
