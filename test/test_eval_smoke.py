"""Real-model smoke test of `python -m kvtuner_hicache.eval` on SmolLM2-135M (CPU, about a minute).

Skipped only when the model is not in the cache AND KVT_REQUIRE_MODELS is unset; with
KVT_REQUIRE_MODELS=1 (scripts/test.sh, CI) a missing model is fetched or the test fails.
"""

from __future__ import annotations

import json
import os
import pathlib

import pytest
from kvtuner_hicache.eval import models

MODEL = "smollm2-135m"
FIELDS = ("config", "effective_bits", "compression_ratio", "ppl", "ppl_delta_pct", "top1_agreement", "kl",
          "windows", "model", "command", "timings")


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    pytest.importorskip("transformers")
    required = bool(os.environ.get("KVT_REQUIRE_MODELS"))
    if not required and not (models.model_present(MODEL) and models.data_dir().is_dir()):
        pytest.skip(f"{MODEL} or the eval data is not in {models.cache_root()} (scripts/fetch_models.sh {MODEL}; "
                    "set KVT_REQUIRE_MODELS=1 to make this a failure)")
    from kvtuner_hicache.eval.cli import main

    out = tmp_path_factory.mktemp("eval") / "smoke.json"
    argv = ["--model", MODEL, "--sweep", "quick", "--windows", "1", "--prefix-len", "256", "--score-len", "128",
            "--gsm8k", "2", "--mmlu", "2", "--json", str(out)]
    if not required:
        argv.append("--no-fetch")
    assert main(argv) == 0
    return json.loads(pathlib.Path(out).read_text())


@pytest.mark.model
def test_records_have_the_documented_fields(result: dict) -> None:
    recs = {r["config"]: r for r in result["records"]}
    assert list(recs) == ["bf16", "K8tV8t-a-g64", "K2tV2t-a-g64"]
    for r in recs.values():
        for f in FIELDS:
            assert f in r, f"{r['config']} lacks {f}"
        assert r["model"] == MODEL and r["windows"] == 1 and r["scored_tokens"] == 128
        assert r["gsm8k"]["answer_tokens"] > 0 and r["mmlu"]["items"] == 2
    assert recs["bf16"]["effective_bits"] == 16.0
    assert 8.0 < recs["K8tV8t-a-g64"]["effective_bits"] < 8.6 and recs["K8tV8t-a-g64"]["compression_ratio"] > 1.8
    assert 2.0 < recs["K2tV2t-a-g64"]["effective_bits"] < 2.6 and recs["K2tV2t-a-g64"]["compression_ratio"] > 6.0
    assert result["meta"]["timings"]["total_s"] > 0 and len(result["meta"]["key_channel_ratio"]) == 30


@pytest.mark.model
def test_unquantized_round_trip_is_exact(result: dict) -> None:
    """`bf16` is scored again through the whole write-back path and must equal the reference run."""
    r = next(r for r in result["records"] if r["config"] == "bf16")
    assert r["ppl"] == pytest.approx(r["ppl_base"], rel=1e-6)
    assert abs(r["ppl_delta_pct"]) < 1e-4 and r["kl"] < 1e-7 and r["top1_agreement"] == 1.0
    assert abs(r["gsm8k"]["delta_nll"]) < 1e-6 and r["mmlu"]["agreement"] == 1.0
    assert 5.0 < r["ppl"] < 200.0  # a real language model on English essays


@pytest.mark.model
def test_kv8_is_near_lossless_and_kv2_per_token_keys_are_not(result: dict) -> None:
    recs = {r["config"]: r for r in result["records"]}
    kv8, kv2 = recs["K8tV8t-a-g64"], recs["K2tV2t-a-g64"]
    assert abs(kv8["ppl_delta_pct"]) < 1.0
    assert kv8["top1_agreement"] > 0.95 and kv8["kl"] < 0.01
    assert kv2["ppl_delta_pct"] > kv8["ppl_delta_pct"] + 5.0
    assert kv2["kl"] > 10 * kv8["kl"] and kv2["top1_agreement"] < kv8["top1_agreement"]
    assert kv2["gsm8k"]["delta_nll"] > kv8["gsm8k"]["delta_nll"]
