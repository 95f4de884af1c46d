// Quantized HiCache page codec: kernel argument structs and launchers (no torch in here).
//
// The byte format is docs/page-format.md; python/kvtuner_hicache/quant/reference.py is the
// ground truth. Every value these kernels write must be bit-identical to the reference.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace kvtq {

constexpr int kThreads = 256;          // threads per block, all kernels
constexpr int kEncItemsPerThread = 4;  // encode, per-token groups: 16-byte items per thread per unit
constexpr int kEncItemsPerUnit = kThreads * kEncItemsPerThread;
constexpr int kEncMaxTokensPerThread = 8;  // encode, per-channel groups: rows held per thread
constexpr int kDecCodeWordsPerThread = 4;   // decode: 16-byte code words per thread per unit
constexpr int kDecMetaWordsPerThread = 2;   // decode: 16-byte words per metadata array per thread
constexpr int kDecMaxCodeBytes = kThreads * kDecCodeWordsPerThread * 16;  // 16 KiB per unit
constexpr int kDecMaxMeta = kThreads * kDecMetaWordsPerThread * 8;         // fp16 entries per array

// Where a kernel reports a bad index instead of faulting. `word` is device memory (0 until the first
// error; an atomicCAS elects one reporter), `report` is device-accessible memory (mapped pinned host
// memory, so that the host reads it without a copy): [code, value, bound, 0], `code` written last.
// A kernel that meets a bad index skips that access (nothing is read or written out of bounds).
enum ErrorCode : int {
  kErrNone = 0, kErrEncodeRow = 1, kErrDecodePage = 2, kErrDecodeRow = 3, kErrEncodePlane = 4, kErrDecodePlane = 5,
  kErrEncodeClass = 6  // a unit whose chunk is not of its launch's (axis, bits) class (value: the unit)
};
struct ErrorSink {
  int32_t* word;
  int64_t* report;
};

// One (stream, layer) chunk of a page, as the encoder needs it. All int32 so that Python can
// build the table as one int32 tensor [chunks, kChunkFields] (field order = declaration order).
struct ChunkDesc {
  int32_t buffer;       // device buffer: 0 = K (MLA: latent row), 1 = V
  int32_t layer;        // local layer
  int32_t bits, axis, group, asym;
  int32_t heads, dim, width, col_off;  // width = heads * dim; col_off = first column in the row
  int32_t offset;       // byte offset of the chunk in the page
  int32_t scale_off, min_off;          // relative to the chunk
  int32_t codes_bytes, num_groups, nbytes;
  int32_t units;        // encode units (blocks) per page for this chunk
  int32_t unit_start;   // prefix sum of `units` over the chunks before this one
  int32_t kc;           // per-channel groups: 8-column items per block row (power of two)
  int32_t ncb;          // per-channel groups: column blocks = ceil(width / 8 / kc)
  // Elastic pages (python/kvtuner_hicache/quant/elastic_pages.py): this chunk's refinement codes r
  // (`bits` bits per element, packed like its codes) live in the refinement plane of `plane_stream`
  // (-1: the chunk has none) at byte `plane_off` of that plane.
  int32_t plane_stream;
  int32_t plane_off;
};
constexpr int kChunkFields = 22;
static_assert(sizeof(ChunkDesc) == kChunkFields * 4, "ChunkDesc must be packed int32");

// A contiguous range of a page's encode units whose chunks share one (axis, bits) class: one launch each.
struct EncodeSpan {
  int32_t unit_begin, units, axis, bits;
};
constexpr int kMaxEncodeSpans = 8;  // (axis, bits) classes: 2 x 4 in use

struct EncodeArgs {
  const ChunkDesc* chunks;      // device
  const int32_t* unit_chunk;    // device, [units_per_page]: unit -> chunk
  const uint64_t* ptrs[2];      // device, per buffer b: [num_layers] layer data pointers (the pool's own table)
  const int64_t* token_index;   // device, [n_pages * page_size]
  const uint8_t* header;        // device, 128 bytes
  uint8_t* out;                 // device, [n_pages, page_bytes] (row stride out_stride)
  int64_t out_stride;
  int64_t row_stride[2];        // elements, per device buffer
  int64_t head_stride[2];
  int64_t rows[2];              // rows per device buffer (token_index is range-checked against them)
  ErrorSink err;
  // Refinement planes (elastic pools; plane_base == nullptr: none). plane_dst[s * plane_n + p] = byte
  // offset from plane_base of page p's plane of stream s (-1: the page gets none); every write is
  // range-checked against plane_bound. plane_base is device-accessible (mapped pinned host memory).
  uint8_t* plane_base;
  const int64_t* plane_dst;
  int64_t plane_n, plane_bound;
  int32_t num_layers, page_size, units_per_page, n_pages, page_base;
  int32_t unit_base;            // first unit of this launch's span (set by launch_encode)
  int32_t n_spans;
  EncodeSpan spans[kMaxEncodeSpans];  // cover [0, units_per_page) in order (checked on the host)
};

// One stream of one layer, as the decoder needs it. Python builds an int64 tensor
// [2, kDecodeFields] per layer (field order = declaration order).
struct DecodeStream {
  int64_t offset, scale_off, min_off;  // chunk offset in the page; sub-arrays relative to it
  int64_t buffer, bits, axis, group, asym;
  int64_t heads, dim, width, col_off;
  int64_t unit_tokens;  // tokens per decode unit (divides page_size)
  int64_t units;        // decode units per page for this stream
  int64_t refine;       // 1: this chunk has refinement codes (elastic pages; asym, bits 2 or 4)
  int64_t plane_off;    // their byte offset inside the stream's refinement plane
};
constexpr int kDecodeFields = 16;
static_assert(sizeof(DecodeStream) == kDecodeFields * 8, "DecodeStream must be packed int64");

struct DecodeArgs {
  DecodeStream st[2];
  const uint8_t* pages;         // device-accessible (pinned host mapped, or device memory)
  int64_t page_stride;          // bytes between pages
  int64_t num_pages;            // pages in the pool (page_ids are range-checked against it)
  const int64_t* page_ids;      // device, [n_pages]
  const int64_t* token_index;   // device, [n_pages * page_size]
  void* dst[2];
  int64_t row_stride[2], head_stride[2];
  int64_t rows[2];              // rows per device buffer (token_index is range-checked against them)
  ErrorSink err;
  // Refinement planes of elastic pages (nullptr: fixed pages only): device [2, n_pages], the byte offset
  // from `pages` of page p's plane of stream s at [s * n_pages + p], -1 = decode that page at its floor.
  // Offsets are range-checked against num_pages * page_stride. Shared memory then holds a second code
  // area of smem_codes bytes after the metadata.
  const int64_t* plane_src;
  int32_t nstreams, page_size, n_pages, units_per_page;
  int32_t smem_codes;           // bytes reserved for codes (multiple of 16)
  int32_t smem_meta;            // fp16 entries reserved per metadata array (multiple of 8)
};

enum DType : int { kBF16 = 0, kFP16 = 1 };

// all_classes: every (axis, bits) class of the page in one launch (small batches), else one launch per class.
cudaError_t launch_encode(const EncodeArgs& a, int dtype, cudaStream_t stream, bool all_classes = false);
cudaError_t launch_decode(const DecodeArgs& a, int dtype, int blocks, cudaStream_t stream);
// Every layer of a load in one launch. `table` is device memory [num_layers] of DecodeArgs whose index
// fields (page_ids, token_index, plane_src, n_pages) are ignored: the launch supplies them. `blocks_per_layer`
// bounds each layer's blocks (<= 0: one block per unit of the largest layer).
cudaError_t launch_decode_layers(const DecodeArgs* table, int num_layers, int max_units_per_page,
                                 const int64_t* page_ids, const int64_t* token_index, const int64_t* plane_src,
                                 int64_t n_pages,
                                 int smem_codes, int smem_meta, int dtype, int blocks_per_layer, cudaStream_t stream);

}  // namespace kvtq
