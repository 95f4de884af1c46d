"""Page layout offsets, header checks, and page-level encode/decode through the reference codec."""

from __future__ import annotations

import pytest
import torch
from kvtuner_hicache.config import KVShape, LayerBits, QuantConfig, load_layer_bits
from kvtuner_hicache.page_format import (
    ALIGN,
    HEADER_BYTES,
    HEADER_CRC_OFFSET,
    PageLayout,
    crc32c,
    key_digest,
    model_digest,
    page_crc,
)
from kvtuner_hicache.quant.reference import (
    decode_layer,
    dequantize_chunk,
    encode_pages,
    quantize_chunk,
    roundtrip_pages,
)

QWEN = KVShape.mha(28, 4, 128)


def test_bytes_per_token_matches_the_formula():
    lay = PageLayout(QuantConfig(), QWEN, 64)
    # K4 per-channel g64 asym + V4 per-token g64 asym, fp16 scale+min, per layer per page
    codes = 64 * 4 * 128 * 4 // 8
    k_meta = (64 // 64) * 4 * 128 * 2 * 2
    v_meta = 64 * 4 * (128 // 64) * 2 * 2
    assert lay.page_bytes == HEADER_BYTES + 28 * (codes + k_meta) + 28 * (codes + v_meta)
    assert lay.k_part_bytes + lay.v_part_bytes == lay.page_bytes
    assert lay.compression_vs_bf16 == pytest.approx(57344 / lay.bytes_per_token)
    assert 4.5 <= lay.effective_bits < 4.51


def test_chunks_are_aligned_and_disjoint():
    lay = PageLayout(QuantConfig(nbits_key=2, asym=False, q_group_size=16), KVShape.mha(3, 3, 80, 48), 16)
    end = HEADER_BYTES
    for c in sorted(lay.chunks.values(), key=lambda c: c.offset):
        assert c.offset == end and c.offset % ALIGN == 0 and c.scale_offset % ALIGN == 0
        assert c.scale_offset >= c.codes_bytes
        end = c.offset + c.nbytes
    assert end == lay.page_bytes


def test_per_layer_table_drives_chunk_bits(mixed_table):
    table = load_layer_bits(mixed_table)  # shipped with the tests: a fresh clone without ../shared runs this too
    assert len({(b.key, b.value) for b in table.values()}) > 1
    lay = PageLayout(QuantConfig(layer_bits=table), QWEN, 64)
    for layer, bits in table.items():
        assert lay.chunk(0, layer).bits == bits.key and lay.chunk(1, layer).bits == bits.value
    uniform = PageLayout(QuantConfig(), QWEN, 64)
    assert lay.fingerprint != uniform.fingerprint


def test_pipeline_stage_uses_global_layer_bits():
    table = {i: LayerBits(8 if i == 5 else 4, 2) for i in range(8)}
    stage = PageLayout(QuantConfig(layer_bits=table), KVShape.mha(4, 2, 64), 64, start_layer=4, total_layers=8)
    assert [stage.chunk(0, i).bits for i in range(4)] == [4, 8, 4, 4]


def _random_pool(shape: KVShape, rows: int, seed: int = 0) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    if shape.is_mla:
        return [[torch.randn(rows, 1, shape.kv_lora_rank + shape.qk_rope_head_dim, generator=g).to(torch.bfloat16) for _ in range(shape.num_layers)]]
    return [[(torch.randn(rows, shape.heads, d, generator=g) * 3).to(torch.bfloat16) for _ in range(shape.num_layers)]
            for d in (shape.head_dim, shape.v_head_dim)]


@pytest.mark.parametrize("page_size", [16, 32, 64, 128])
@pytest.mark.parametrize("shape", [KVShape.mha(2, 4, 128), KVShape.mha(2, 2, 64, 32), KVShape.mla(2)], ids=["qwen", "asymdims", "mla"])
def test_encode_decode_scatter_with_odd_indices(page_size, shape):
    cfg = QuantConfig(nbits_key=8 if shape.is_mla else 4, nbits_value=2, q_group_size=16)
    lay = PageLayout(cfg, shape, page_size)
    pool = _random_pool(shape, rows=8 * page_size)
    src_pages = torch.tensor([5, 1, 6])  # non-contiguous, out of order device pages
    token_index = (src_pages[:, None] * page_size + torch.arange(page_size)).reshape(-1)
    host = torch.zeros(10, lay.page_bytes, dtype=torch.uint8)
    staging = torch.empty(3, lay.page_bytes, dtype=torch.uint8)
    encode_pages(lay, pool, token_index, staging)
    host_ids = torch.tensor([7, 0, 3])
    host[host_ids] = staging
    for i in range(3):
        assert lay.check_page(staging[i].numpy().tobytes(), verify_crc=False) is None
    # load back into other device rows
    dst = [[torch.zeros_like(t) for t in per] for per in pool]
    dst_pages = torch.tensor([0, 2, 4])
    dst_index = (dst_pages[:, None] * page_size + torch.arange(page_size)).reshape(-1)
    for layer in range(shape.num_layers):
        decode_layer(lay, layer, host, host_ids, [b[layer] for b in dst], dst_index)
    expect = roundtrip_pages(lay, [[t[token_index] for t in per] for per in pool])
    for b in range(len(pool)):
        for layer in range(shape.num_layers):
            assert torch.equal(dst[b][layer][dst_index], expect[b][layer])
            untouched = torch.ones(dst[b][layer].shape[0], dtype=torch.bool)
            untouched[dst_index] = False
            assert not dst[b][layer][untouched].any()


def test_chunk_roundtrip_error_follows_bits():
    shape = KVShape.mha(1, 2, 64)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 64, 2, 64, generator=g).to(torch.bfloat16)
    errs = []
    for bits in (8, 4, 2):
        lay = PageLayout(QuantConfig(nbits_key=bits, nbits_value=bits), shape, 64)
        spec = lay.chunk(0, 0)
        errs.append(float((dequantize_chunk(quantize_chunk(x, spec), spec) - x.float()).pow(2).mean()))
    assert errs[0] < errs[1] < errs[2]
    assert errs[0] < 1e-4 and errs[1] < 0.02


def _sealed_page(lay: PageLayout, shape: KVShape, model: bytes, key: bytes) -> bytearray:
    page = torch.empty(1, lay.page_bytes, dtype=torch.uint8)
    encode_pages(lay, _random_pool(shape, 64), torch.arange(64), page)
    raw = bytearray(page[0].numpy().tobytes())
    assert lay.check_page(raw, verify_crc=False) is None  # the encoder's header: unsealed but valid
    assert lay.check_page(raw) == "checksum mismatch"  # CRC 0 until sealed
    lay.seal(raw, model, key)
    return raw


MODEL, KEY = model_digest("org/model|tp0/1"), key_digest("a" * 64)


def test_header_checks_detect_corruption_truncation_and_foreign_config():
    shape = KVShape.mha(2, 2, 64)
    lay = PageLayout(QuantConfig(), shape, 64)
    raw = _sealed_page(lay, shape, MODEL, KEY)
    assert lay.check_page(raw, model=MODEL, key=KEY) is None
    assert int.from_bytes(raw[HEADER_CRC_OFFSET:HEADER_BYTES], "little") == page_crc(raw)
    bad = bytearray(raw)
    bad[HEADER_BYTES + 100] ^= 0x10
    assert lay.check_page(bad) == "checksum mismatch"
    assert "size" in lay.check_page(raw[:-1])
    assert lay.check_page(bytes(lay.page_bytes)) == "bad magic"
    other = PageLayout(QuantConfig(nbits_value=2), shape, 64)
    padded = bytes(raw) + bytes(max(0, other.page_bytes - len(raw)))
    assert other.check_page(padded[: other.page_bytes]) is not None
    same_size_other_cfg = PageLayout(QuantConfig(axis_key=0), shape, 64)
    assert same_size_other_cfg.page_bytes == lay.page_bytes
    assert same_size_other_cfg.check_page(raw) == "written by another quantization config"
    assert lay.tag.startswith("kvtq2-") and lay.tag != same_size_other_cfg.tag


def test_page_is_bound_to_its_key_and_model():
    shape = KVShape.mha(2, 2, 64)
    lay = PageLayout(QuantConfig(), shape, 64)
    raw = _sealed_page(lay, shape, MODEL, KEY)
    assert lay.check_page(raw, model=MODEL, key=key_digest("b" * 64)) == "stored under another key"
    assert lay.check_page(raw, model=model_digest("other/model|tp0/1"), key=KEY) == "written by another model or rank"
    assert lay.first_bad_page([raw, raw], [KEY, key_digest("b" * 64)], MODEL) == (1, "stored under another key")
    assert lay.first_bad_page([raw], [KEY], MODEL) is None


@pytest.mark.parametrize("offset", list(range(0, HEADER_BYTES, 3)))
def test_every_header_byte_is_covered(offset):
    """A flip anywhere in the header (layout fields, digests, reserved bytes, CRC) is caught."""
    shape = KVShape.mha(1, 2, 64)
    lay = PageLayout(QuantConfig(), shape, 64)
    raw = _sealed_page(lay, shape, MODEL, KEY)
    raw[offset] ^= 0x01
    assert lay.check_page(raw, model=MODEL, key=KEY) is not None
    assert lay.first_bad_page([raw], [KEY], MODEL) is not None


def test_format_1_pages_are_rejected_never_misread():
    """A v1 page (same payload offsets, v1 header) of the same layout is a miss, not a load."""
    import struct
    import zlib

    shape = KVShape.mha(2, 2, 64)
    lay = PageLayout(QuantConfig(), shape, 64)
    raw = _sealed_page(lay, shape, MODEL, KEY)
    v1 = struct.pack("<4sHHHHHI16sI", b"KVTQ", 1, 128, 64, lay.num_layers, 2, lay.page_bytes, lay.fingerprint,
                     zlib.crc32(memoryview(raw)[HEADER_BYTES:]))
    raw[:HEADER_BYTES] = v1 + bytes(HEADER_BYTES - len(v1))
    assert lay.check_page(raw, model=MODEL, key=KEY) == "page format 1, expected 2"
    assert lay.first_bad_page([raw], [KEY], MODEL) == (0, "page format 1, expected 2")


def test_crc32c_is_the_castagnoli_polynomial():
    assert crc32c(b"123456789") == 0xE3069283  # the standard check value
    assert crc32c(b"6789", crc32c(b"12345")) == 0xE3069283


def test_batch_check_finds_the_first_bad_page_whatever_kind():
    """CRCs of a batch run in parallel; the verdict is still the first bad page in order."""
    from kvtuner_hicache.page_format import page_crc, page_crcs

    shape = KVShape.mha(2, 2, 64)
    lay = PageLayout(QuantConfig(), shape, 64)
    pages = [_sealed_page(lay, shape, MODEL, KEY) for _ in range(9)]
    assert page_crcs([memoryview(p) for p in pages]) == [page_crc(p) for p in pages]
    assert lay.first_bad_page(pages, [KEY] * 9, MODEL) is None
    crc_bad = [bytearray(p) for p in pages]
    crc_bad[6][HEADER_BYTES + 5] ^= 0x01  # a payload flip: checksum
    assert lay.first_bad_page(crc_bad, [KEY] * 9, MODEL) == (6, "checksum mismatch")
    keys = [KEY] * 9
    keys[7] = key_digest("b" * 64)  # a later header problem does not hide the earlier checksum one
    assert lay.first_bad_page(crc_bad, keys, MODEL) == (6, "checksum mismatch")
    keys[3] = key_digest("c" * 64)  # an earlier header problem wins over the later checksum
    assert lay.first_bad_page(crc_bad, keys, MODEL) == (3, "stored under another key")
    assert lay.first_bad_page(pages[:4] + [pages[4][:100]], [KEY] * 5, MODEL) == (4, f"size 100 != {lay.page_bytes}")


def test_an_installed_batch_crc_serves_seal_and_check_until_removed():
    """set_batch_crc routes every batch through one function (the kernel wheel's, on GPU hosts);
    None brings the crc32c package back. A wrong batch CRC shows as checksum misses, never as a pass."""
    from kvtuner_hicache import page_format as pf

    shape = KVShape.mha(2, 2, 64)
    lay = PageLayout(QuantConfig(), shape, 64)
    pages = [_sealed_page(lay, shape, MODEL, KEY) for _ in range(4)]
    calls: list[int] = []

    def batch(views):
        calls.append(len(views))
        return [pf.page_crc(v) for v in views]

    try:
        pf.set_batch_crc(batch, "test batch")
        assert pf.batch_crc_name() == "test batch"
        assert lay.first_bad_page(pages, [KEY] * 4, MODEL) is None and calls == [4]
        pf.set_batch_crc(lambda views: [0] * len(views), "wrong")
        assert lay.first_bad_page(pages, [KEY] * 4, MODEL) == (0, "checksum mismatch")
    finally:
        pf.set_batch_crc(None)
    assert pf.batch_crc_name().startswith("crc32c package")
    assert lay.first_bad_page(pages, [KEY] * 4, MODEL) is None


def test_batch_seal_equals_page_by_page_seal():
    from kvtuner_hicache.page_format import key_digest as kd

    shape = KVShape.mha(2, 2, 64)
    lay = PageLayout(QuantConfig(), shape, 64)
    one = [_sealed_page(lay, shape, MODEL, KEY) for _ in range(5)]
    many = [bytearray(p) for p in one]
    keys = [kd(f"k{i}") for i in range(5)]
    for p, k in zip(one, keys, strict=True):
        lay.seal(p, MODEL, k)
    lay.seal_pages(many, MODEL, keys)
    assert many == one
    assert lay.first_bad_page(many, keys, MODEL) is None
