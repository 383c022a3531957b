"""RAP Serve: runtime-adaptive pruning of LLM blocks to fit the memory a replica has.

Heavy imports (torch, transformers) stay inside the functions that need them.
"""

from rap.core.errors import RapError
from rap.core.loading import DEFAULT_MODEL, load_config, load_model
from rap.core.masks import KeepMask, MaskVersion

__all__ = ["DEFAULT_MODEL", "KeepMask", "MaskVersion", "RapError", "load_config", "load_model"]
