"""KV shape of a Hugging Face model config (object or config.json dict), without loading the model."""

from __future__ import annotations

import json
import os
from typing import Any

from kvtuner_hicache.config import KVShape


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    return cfg.get(name, default) if isinstance(cfg, dict) else getattr(cfg, name, default)


def kv_shape_from_hf(cfg: Any) -> KVShape:
    """The whole model's KV shape (all layers, all KV heads); MLA when the config has `kv_lora_rank`."""
    if not isinstance(cfg, dict) and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    elif isinstance(cfg, dict) and isinstance(cfg.get("text_config"), dict):
        cfg = cfg["text_config"]
    layers = int(_get(cfg, "num_hidden_layers"))
    if _get(cfg, "kv_lora_rank"):
        return KVShape.mla(layers, int(_get(cfg, "kv_lora_rank")), int(_get(cfg, "qk_rope_head_dim")))
    heads = int(_get(cfg, "num_attention_heads"))
    kv_heads = int(_get(cfg, "num_key_value_heads") or heads)
    head_dim = int(_get(cfg, "head_dim") or int(_get(cfg, "hidden_size")) // heads)
    return KVShape.mha(layers, kv_heads, head_dim)


def kv_shape_from_model_path(path: str) -> KVShape | None:
    """Shape from `<path>/config.json` when `path` is a local folder; None otherwise (hub ids, odd configs)."""
    f = os.path.join(path, "config.json")
    if not os.path.isfile(f):
        return None
    try:
        with open(f) as fh:
            return kv_shape_from_hf(json.load(fh))
    except (OSError, ValueError, TypeError, KeyError):
        return None
