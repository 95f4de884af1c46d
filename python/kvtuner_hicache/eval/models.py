"""Where the converted models and eval data live, fetching them, and loading a model on CPU."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from kvtuner_hicache.config import KVShape
from kvtuner_hicache.model_shape import kv_shape_from_hf

MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "gemma-3-270m")
REPO = pathlib.Path(__file__).resolve().parents[3]
FETCH_SCRIPT = REPO / "scripts" / "fetch_models.sh"


def cache_root() -> pathlib.Path:
    """`$KVT_MODEL_CACHE`, default `<repo>/.cache/models`."""
    env = os.environ.get("KVT_MODEL_CACHE")
    return pathlib.Path(env) if env else REPO / ".cache" / "models"


def model_dir(name: str) -> pathlib.Path:
    return cache_root() / name / "hf"


def data_dir() -> pathlib.Path:
    return cache_root() / "data"


def model_present(name: str) -> bool:
    d = model_dir(name)
    return (d / "config.json").is_file() and any(d.glob("*.safetensors"))


def fetch(what: str) -> None:
    """Run `scripts/fetch_models.sh WHAT` (downloads and converts into the cache)."""
    if not FETCH_SCRIPT.is_file():
        raise FileNotFoundError(f"{what} is not in {cache_root()} and {FETCH_SCRIPT} does not exist")
    print(f"[eval] fetching {what}: {FETCH_SCRIPT} {what}", file=sys.stderr, flush=True)
    env = dict(os.environ, KVT_MODEL_CACHE=str(cache_root()))
    subprocess.run(["bash", str(FETCH_SCRIPT), what], check=True, env=env)


def ensure_model(name: str, allow_fetch: bool = True) -> pathlib.Path:
    if name not in MODELS:
        raise ValueError(f"--model {name!r}: choose one of {', '.join(MODELS)}")
    if not model_present(name):
        if not allow_fetch:
            raise FileNotFoundError(f"model {name} not found in {model_dir(name)} (run scripts/fetch_models.sh {name})")
        fetch(name)
        if not model_present(name):
            raise FileNotFoundError(f"scripts/fetch_models.sh {name} did not produce {model_dir(name)}")
    return model_dir(name)


def kv_shape_of(config: Any) -> KVShape:
    """The per-layer KV shape of an HF config (text part for multimodal configs)."""
    return kv_shape_from_hf(config)


@dataclass
class LoadedModel:
    name: str
    path: pathlib.Path
    model: Any  # transformers PreTrainedModel
    tokenizer: Any
    shape: KVShape
    load_s: float


def load(name: str, allow_fetch: bool = True) -> LoadedModel:
    """Load the converted fp32 safetensors copy of `name` (fetching it first if missing)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_model(name, allow_fetch)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return LoadedModel(name, path, model, tok, kv_shape_of(model.config), time.perf_counter() - t0)
