"""Plumbing of the accuracy harness, no real model needed: config names, page round trip of a
prefix (residual pages, sliding layers), cache write-back on tiny randomly initialised models."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from kvtuner_hicache.config import AXIS_PER_CHANNEL, AXIS_PER_TOKEN, KVShape, LayerBits, QuantConfig
from kvtuner_hicache.eval import data as D
from kvtuner_hicache.eval.configs import (
    SEED_CONFIG,
    SWEEPS,
    ConfigContext,
    EvalConfig,
    expand_names,
    mixed_table,
    parse_config,
    resolve,
    uniform_name,
)
from kvtuner_hicache.eval.harness import (
    Harness,
    apply_config,
    build_cache,
    cache_kv,
    compare,
    key_channel_ratio,
    make_ref,
    run_text,
    whole_pages,
)
from kvtuner_hicache.eval.report import markdown, record, sizes
from kvtuner_hicache.quant.reference import roundtrip_pages

transformers = pytest.importorskip("transformers")

QWEN15 = KVShape.mha(28, 2, 128)
SMOL = KVShape.mha(30, 3, 64)
REF = EvalConfig("ref", None, "bf16")


def _ctx(shape: KVShape = SMOL, page: int = 64, ratio: list[float] | None = None) -> ConfigContext:
    return ConfigContext(shape, page, 0, ratio if ratio is not None else [1.0] * shape.num_layers)


# ---- config names -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["K4cV4t-a-g64", "K8tV8t-a-g64", "K2cV2t-s-g32", "K4tV4t-a-g64+r128", "K8cV4t-a-g64",
                                  "K3cV2t-a-g64", "K3tV3t-s-g32"])
def test_uniform_names_round_trip(name: str) -> None:
    cfg = parse_config(name, _ctx())
    assert cfg.quant is not None and uniform_name(cfg.quant) == name


def test_named_configs() -> None:
    assert parse_config("default", _ctx()).quant == QuantConfig()
    seed = parse_config("seed", _ctx()).quant
    assert seed == SEED_CONFIG
    assert (seed.asym, seed.axis_key, seed.axis_value, seed.q_group_size, seed.residual_length) == (False, 0, 0, 64, 128)
    assert parse_config("bf16", _ctx()).quant is None and parse_config("fp32", _ctx()).kv_dtype == "fp32"
    # --residual-length applies to names without +rN, never overrides the seed's own 128
    ctx = ConfigContext(SMOL, 64, 64, [1.0] * 30)
    assert parse_config("K4cV4t-a-g64", ctx).residual_pages(64) == 1
    assert parse_config("K4cV4t-a-g64+r0", ctx).residual_length == 0
    assert parse_config("seed", ctx).residual_length == 128
    assert parse_config("K4cV4t-a-g64+r65", ctx).residual_pages(64) == 2  # rounded up to whole pages


def test_invalid_configs_are_skipped_with_a_reason() -> None:
    ok, skipped = resolve(["K4cV4t-a-g128", "K4tV4t-a-g128", "nonsense", "bf16+r64"], _ctx(SMOL))
    assert ok == []
    reasons = dict(skipped)
    assert "page-size" in reasons["K4cV4t-a-g128"]  # per-channel groups must fit in a 64-token page
    assert "head" in reasons["K4tV4t-a-g128"]  # 128 does not divide head_dim 64
    assert "unknown config" in reasons["nonsense"]
    # head_dim 128: per-token g128 is valid
    assert [c.name for c in resolve(["K4tV4t-a-g128"], _ctx(QWEN15))[0]] == ["K4tV4t-a-g128"]


@pytest.mark.parametrize("shape", [QWEN15, SMOL, KVShape.mha(24, 2, 64), KVShape.mha(18, 1, 256)])
def test_default_sweep_resolves(shape: KVShape) -> None:
    ok, skipped = resolve(expand_names("default", None), _ctx(shape))
    assert [n for n, _ in skipped] == ["K4cV4t-a-g128"]
    assert len(ok) == len(SWEEPS["default"]) - 1
    assert len(expand_names("quick", None)) == 3
    assert expand_names("default", "bf16, K8tV8t-a-g64,bf16") == ["bf16", "K8tV8t-a-g64"]


def test_mixed_table_picks_key_outlier_layers() -> None:
    ratio = [280.0, 90.0, 10.0, 11.0, 9.0, 12.0, 45.0, 10.0]
    table, layers = mixed_table(ratio)
    assert layers == (0, 1)  # 3 outliers (>= 2x median), capped at ceil(8/4) = 2, largest first
    assert table[0] == LayerBits(8, 4) and table[6] == LayerBits(4, 2) and len(table) == 8
    _, flat = mixed_table([5.0] * 4)
    assert flat == (0,)  # always at least one
    cfg = parse_config("mixed", _ctx(KVShape.mha(8, 2, 64), ratio=ratio))
    assert cfg.mixed_layers == (0, 1) and cfg.quant is not None and cfg.quant.axis_key == AXIS_PER_CHANNEL


# ---- the page round trip of a prefix ------------------------------------------------------------


def _kv(layers: int = 3, heads: int = 2, seq: int = 64, dim: int = 64, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(layers):
        k = torch.randn(1, heads, seq, dim, generator=g) * 3
        k[..., 5] += 20.0  # an outlier channel
        out.append((k, torch.randn(1, heads, seq, dim, generator=g)))
    return out


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).float()


def test_residual_pages_stay_exact_bf16() -> None:
    shape, ps = KVShape.mha(3, 2, 64), 16
    kv = _kv()
    for residual, exact_pages in ((16, 1), (17, 2), (0, 0), (1000, 4)):
        cfg = parse_config(f"K2tV2t-a-g16+r{residual}", ConfigContext(shape, ps))
        out = apply_config(kv, cfg, cfg.layout(shape, ps), ps)
        q = 64 - exact_pages * ps
        for (k, v), (k2, v2) in zip(kv, out, strict=True):
            assert k2.dtype == torch.float32 and k2.shape == k.shape
            assert torch.equal(k2[:, :, q:], _bf16(k)[:, :, q:]) and torch.equal(v2[:, :, q:], _bf16(v)[:, :, q:])
            if q:
                assert not torch.equal(k2[:, :, :q], _bf16(k)[:, :, :q])


def test_quantized_part_is_the_page_format_round_trip() -> None:
    shape, ps = KVShape.mha(3, 2, 64), 16
    kv = _kv()
    cfg = parse_config("K4cV2t-a-g16", ConfigContext(shape, ps))
    layout = cfg.layout(shape, ps)
    out = apply_config(kv, cfg, layout, ps)
    pool = [[k[0].transpose(0, 1).to(torch.bfloat16).contiguous() for k, _ in kv],
            [v[0].transpose(0, 1).to(torch.bfloat16).contiguous() for _, v in kv]]
    rt = roundtrip_pages(layout, pool)
    for i, (k2, v2) in enumerate(out):
        assert torch.equal(k2[0].transpose(0, 1), rt[0][i].float())
        assert torch.equal(v2[0].transpose(0, 1), rt[1][i].float())
    # KV8 error is far below KV2's
    err = {n: max(float((o[0] - _bf16(i[0])).abs().max()) for i, o in zip(kv, apply_config(
        kv, c, c.layout(shape, ps), ps), strict=True)) for n, c in
        ((n, parse_config(n, ConfigContext(shape, ps))) for n in ("K8tV8t-a-g16", "K2tV2t-a-g16"))}
    assert err["K8tV8t-a-g16"] * 20 < err["K2tV2t-a-g16"]


def test_three_bit_pages_sit_between_two_and_four_bits() -> None:
    """3-bit codes: 3/4 of a 4-bit page's code bytes, and an error between KV2's and KV4's."""
    shape, ps = KVShape.mha(3, 2, 64), 16
    kv = _kv()
    cfgs = {n: parse_config(n, ConfigContext(shape, ps)) for n in ("K2tV2t-a-g16", "K3tV3t-a-g16", "K4tV4t-a-g16")}
    chunk = {n: c.layout(shape, ps).chunk(0, 0) for n, c in cfgs.items()}
    assert chunk["K3tV3t-a-g16"].codes_bytes * 4 == chunk["K4tV4t-a-g16"].codes_bytes * 3
    err = {n: max(float((o[0] - _bf16(i[0])).abs().max()) for i, o in
                  zip(kv, apply_config(kv, c, c.layout(shape, ps), ps), strict=True)) for n, c in cfgs.items()}
    assert err["K4tV4t-a-g16"] < err["K3tV3t-a-g16"] < err["K2tV2t-a-g16"]


def test_unquantized_variants() -> None:
    kv = _kv()
    fp32 = apply_config(kv, EvalConfig("fp32", None, "fp32"), None, 16)
    assert all(a is b for (a, _), (b, _) in zip(kv, fp32, strict=True))
    bf = apply_config(kv, REF, None, 16)
    assert all(torch.equal(k2, _bf16(k)) for (k, _), (k2, _) in zip(kv, bf, strict=True))


def test_short_sliding_layer_is_aligned_to_absolute_positions() -> None:
    """A sliding layer caches only the last S tokens: per-token groups give the same values as in a full layer."""
    shape, ps = KVShape.mha(2, 2, 64), 16
    full = _kv(layers=1)[0]
    short = (full[0][:, :, 24:].clone(), full[1][:, :, 24:].clone())
    for name in ("K4tV4t-a-g16", "K4cV4t-a-g16"):
        cfg = parse_config(name, ConfigContext(shape, ps))
        (kf, vf), (ks, vs) = apply_config([full, short], cfg, cfg.layout(shape, ps), ps)
        assert ks.shape == short[0].shape and torch.isfinite(ks).all()
        if cfg.quant is not None and cfg.quant.axis_key == AXIS_PER_TOKEN:
            assert torch.equal(ks, kf[:, :, 24:]) and torch.equal(vs, vf[:, :, 24:])
        else:  # per-channel: pages wholly inside the window (tokens 32..63) match the full layer
            assert torch.equal(ks[:, :, 8:], kf[:, :, 32:]) and torch.equal(vs, vf[:, :, 24:])


# ---- tiny real transformers models --------------------------------------------------------------


def _llama() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                                   max_position_embeddings=512)
    return transformers.LlamaForCausalLM(cfg).eval()


def _gemma() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                                        max_position_embeddings=512, sliding_window=24,
                                        layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    return transformers.Gemma3ForCausalLM(cfg).eval()


def _ids(n: int, seed: int = 1) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("make", [_llama, _gemma])
def test_cache_write_back(make: Callable[[], torch.nn.Module]) -> None:
    from kvtuner_hicache.eval.models import kv_shape_of

    model = make()
    h = Harness(model, kv_shape_of(model.config), 16, batch=3)
    ids = _ids(97)
    cache = h.prefill(ids[:64])
    kv = cache_kv(cache)
    assert all(k.shape[0] == 1 and k.shape[1] == 1 and k.shape[3] == 64 for k, _ in kv)
    with torch.inference_mode():
        direct = model(input_ids=torch.tensor([ids[64:]]), past_key_values=copy.deepcopy(cache), use_cache=True).logits[0]
        whole = model(input_ids=torch.tensor([ids])).logits[0, 64:]
    assert torch.allclose(direct, whole, atol=1e-4)
    # writing the untouched KV back reproduces the direct continuation bit for bit
    (_, same), = h.forward(cache, [("fp32", apply_config(kv, EvalConfig("fp32", None, "fp32"), None, 16))], ids[64:])
    assert torch.equal(same, direct)
    # the prefill cache itself is never modified by scoring
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(kv, cache_kv(cache), strict=True))
    # a batch of variants gives what each gives alone
    shape = kv_shape_of(model.config)
    cfgs = [parse_config(n, ConfigContext(shape, 16)) for n in ("bf16", "K2tV2t-a-g16", "K4cV4t-a-g16")]
    variants = [(c.name, apply_config(kv, c, c.layout(shape, 16), 16)) for c in cfgs]
    batched = dict(h.forward(cache, variants, ids[64:]))
    for name, v in variants:
        (_, alone), = Harness(model, shape, 16, batch=1).forward(cache, [(name, v)], ids[64:])
        assert torch.allclose(batched[name], alone, atol=1e-4)
    with pytest.raises(ValueError, match="shape"):
        build_cache(cache, [[(k[:, :, :16], v) for k, v in kv]])


def test_run_text_metrics_on_a_tiny_model() -> None:
    from kvtuner_hicache.eval.models import kv_shape_of

    model = _llama()
    shape = kv_shape_of(model.config)
    h = Harness(model, shape, 16, batch=2)
    windows = [_ids(97, s) for s in (1, 2)]
    ctx = ConfigContext(shape, 16, 0, key_channel_ratio(cache_kv(h.prefill(windows[0][:64]))))
    cfgs, skipped = resolve(["bf16", "fp32", "K8tV8t-a-g16", "K2tV2t-a-g16", "K4cV4t-a-g16+r64"], ctx)
    assert not skipped
    acc = run_text(h, windows, 64, cfgs, REF)
    assert acc["ref"].n == 2 * 32 and len(acc["ref"].per_window_nll) == 2
    assert acc["bf16"].nll == acc["ref"].nll and acc["bf16"].kl == 0.0 and acc["bf16"].top1 == acc["bf16"].n
    assert acc["K4cV4t-a-g16+r64"].nll == acc["ref"].nll  # residual covers the whole prefix: nothing quantized
    assert acc["K8tV8t-a-g16"].kl < acc["K2tV2t-a-g16"].kl
    recs = [record(c, c.layout(shape, 16), shape, 16, 64, acc[c.name], acc["ref"], None, None, None, None) for c in cfgs]
    by = {r["config"]: r for r in recs}
    for r in recs:
        for key in ("config", "effective_bits", "compression_ratio", "ppl", "ppl_delta_pct", "top1_agreement", "kl"):
            assert key in r
    assert by["bf16"]["ppl_delta_pct"] == 0.0 and by["bf16"]["effective_bits"] == 16.0
    assert by["K8tV8t-a-g16"]["compression_ratio"] > 1.5
    assert by["K4cV4t-a-g16+r64"]["prefix_effective_bits"] == pytest.approx(16.0)
    table = markdown(recs)
    assert table.count("\n") == len(recs) + 1 and "K2tV2t-a-g16" in table


def test_prefix_bits_count_residual_pages() -> None:
    cfg = parse_config("K4cV4t-a-g64+r128", _ctx(QWEN15))
    s = sizes(cfg, cfg.layout(QWEN15, 64), QWEN15, 64, 1536)
    # 22 quantized pages + 2 bf16 pages
    assert s["prefix_effective_bits"] == pytest.approx((22 * s["effective_bits"] + 2 * 16) / 24, rel=1e-9)
    assert 4.5 < s["effective_bits"] < 4.51 and s["compression_ratio"] == pytest.approx(16 / s["effective_bits"])


def test_compare_and_whole_pages() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 50, generator=g)
    targets = torch.randint(0, 50, (10,), generator=g)
    nll, kl, top = compare(logits, targets, make_ref(logits), chunk=3)
    assert nll == pytest.approx(float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum")), rel=1e-5)
    assert abs(kl) < 1e-5 and top == 10
    other = logits + torch.randn(10, 50, generator=g)
    assert compare(other, targets, make_ref(logits))[1] > 0.01
    assert len(whole_pages([7], list(range(100)), 16)) == 96
    assert whole_pages([7], list(range(100)), 16)[:2] == [7, 5]  # left-truncated, BOS kept
    with pytest.raises(ValueError):
        whole_pages([], list(range(10)), 16)


def test_window_offsets_and_prompts() -> None:
    assert D.window_offsets(1000, 100, 4) == [0, 300, 600, 900]
    assert D.window_offsets(1000, 100, 1) == [0]
    wins = D.text_windows(list(range(1000)), [9999], 101, 3)
    assert [len(w) for w in wins] == [101] * 3 and wins[0][0] == 9999 and wins[2][-1] == 999
    item = D.MCQ("2+2?", ("1", "2", "3", "4"), 3, "math")
    assert D.mmlu_question(item).endswith("D. 4\nAnswer:")
    assert D.mmlu_fewshot([item]).endswith("Answer: D\n\n")
    q, a = D.gsm8k_item(D.QA("How many?", "2+2=4\n#### 4"))
    assert q.endswith("Answer:") and a.startswith(" 2+2")
