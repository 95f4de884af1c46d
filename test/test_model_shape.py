"""KV shapes read from Hugging Face configs (used by the launcher's early checks and the harness)."""

from __future__ import annotations

import json

from kvtuner_hicache.config import KVShape
from kvtuner_hicache.model_shape import kv_shape_from_hf, kv_shape_from_model_path


def test_gqa_mla_and_nested_text_configs(tmp_path):
    qwen = {"num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "hidden_size": 3584}
    assert kv_shape_from_hf(qwen) == KVShape.mha(28, 4, 128)
    assert kv_shape_from_hf({**qwen, "head_dim": 256}) == KVShape.mha(28, 4, 256)
    deepseek = {"num_hidden_layers": 61, "num_attention_heads": 128, "kv_lora_rank": 512, "qk_rope_head_dim": 64,
                "hidden_size": 7168}
    assert kv_shape_from_hf(deepseek) == KVShape.mla(61, 512, 64)
    assert kv_shape_from_hf({"text_config": qwen}) == KVShape.mha(28, 4, 128)
    (tmp_path / "config.json").write_text(json.dumps(qwen))
    assert kv_shape_from_model_path(str(tmp_path)) == KVShape.mha(28, 4, 128)
    assert kv_shape_from_model_path("Qwen/Qwen2.5-7B-Instruct") is None  # hub ids: the pool checks later
    (tmp_path / "config.json").write_text("{not json")
    assert kv_shape_from_model_path(str(tmp_path)) is None
