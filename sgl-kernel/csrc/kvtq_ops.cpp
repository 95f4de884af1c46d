// Torch operators of the quantized HiCache page codec (kvtq_kernels.cu), registered with
// TORCH_LIBRARY under `torch.ops.kvtq`. The Python side is python/kvtuner_hicache/quant/native.py
// (low-level wrappers) and quant/codec.py (NativeCodec, one object per host pool).
//
// Operators (schemas below):
//   abi_stamp()       build stamp "kvtq <version>; torch <version>; cuda <version>; archs <list>"
//   limits()          the kernel limits Python plans with (never mirrored by hand)
//   mapped_pointer(t) device address of a CUDA tensor or of pinned host memory (resolved once per pool)
//   encode            quantize device rows into whole pages in GPU memory (one launch, all layers)
//   backup            encode into GPU staging and DMA the pages to pinned host pages (owned side stream);
//                     small batches are encoded straight into the mapped host pages (direct_pages)
//   decode            dequantize one layer of pages (zero-copy reads of pinned pages) into device rows
//   decode_table      the per-layer launch arguments of every layer, as a device table (built once per pool)
//   decode_layers     dequantize every layer of a load in one launch, from that table (small loads)
//   stage_copies      copy byte ranges of pinned host pages into GPU staging with the copy engine
//   StagedRing        the staged load of mid-size batches (DMA into GPU staging, then decode from device
//                     memory): a class that enqueues a whole load's copies and decodes from C++
//   page_crcs, crc32c_hardware   CRC32C of a batch of host pages without the GIL (kvtq_crc.cpp, CPU only)
// encode/backup/decode/decode_layers take optional refinement planes (elastic pools): per page and
// stream a byte offset of its plane in the host buffer (-1: none), range-checked in the kernels.
// Bad indices never fault: host page ids given on the CPU are checked before anything is enqueued
// (IndexError); device rows and page ids given on the GPU are checked in the kernels, which skip the
// access and report the first bad index through an ErrorSink that the Python codec reads (no sync).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include "kvtq_check.h"

#include <algorithm>
#include <cstring>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "kvtq_kernels.h"

#ifndef KVTQ_VERSION
#error "KVTQ_VERSION must be defined by the build (CMakeLists.txt or the JIT build in quant/native.py)"
#endif
#ifndef KVTQ_TORCH_VERSION
#error "KVTQ_TORCH_VERSION must be defined by the build"
#endif
#ifndef KVTQ_CUDA_ARCHS
#define KVTQ_CUDA_ARCHS "unknown"
#endif
#define KVTQ_STR2(x) #x
#define KVTQ_STR(x) KVTQ_STR2(x)

namespace {

#define KVTQ_CUDA_OK(expr)                                                                     \
  do {                                                                                         \
    const cudaError_t _e = (expr);                                                             \
    KVTQ_CHECK(_e == cudaSuccess, "kvtq: ", #expr, " failed: ", cudaGetErrorString(_e));      \
  } while (0)

// Field order of the CPU int64 `geom` tensor of encode/backup (quant/native.py builds it).
enum Geom : int {
  kGeomLayers, kGeomPageSize, kGeomUnitsPerPage, kGeomDType, kGeomRowStride0, kGeomRowStride1,
  kGeomHeadStride0, kGeomHeadStride1, kGeomRows0, kGeomRows1, kGeomErrReport,
  kGeomNumSpans,  // then kMaxEncodeSpans x (unit_begin, units, axis, bits): the plan's launch classes
  kGeomSpans, kGeomFields = kGeomSpans + 4 * kvtq::kMaxEncodeSpans
};
// Field order of the CPU int64 `cfg` tensor of decode (built once per pool).
enum DecCfg : int {
  kCfgPagesPtr, kCfgPageStride, kCfgNumPages, kCfgPageSize, kCfgSmemCodes, kCfgSmemMeta, kCfgBlocks,
  kCfgErrReport, kCfgFields
};

std::string abi_stamp() {
  return std::string("kvtq ") + KVTQ_VERSION + "; torch " + KVTQ_TORCH_VERSION + "; cuda " +
         KVTQ_STR(CUDART_VERSION) + "; archs " + KVTQ_CUDA_ARCHS;
}

c10::Dict<std::string, int64_t> limits() {
  c10::Dict<std::string, int64_t> d;
  d.insert("threads", kvtq::kThreads);
  d.insert("chunk_fields", kvtq::kChunkFields);
  d.insert("decode_fields", kvtq::kDecodeFields);
  d.insert("enc_items_per_unit", kvtq::kEncItemsPerUnit);
  d.insert("enc_max_tokens_per_thread", kvtq::kEncMaxTokensPerThread);
  d.insert("enc_max_group_per_token", 2048);    // axis 0: G/8 items reduced inside one block
  d.insert("enc_max_group_per_channel", kvtq::kEncMaxTokensPerThread * kvtq::kThreads);  // axis 1: G rows held by one block
  d.insert("dec_max_code_bytes", kvtq::kDecMaxCodeBytes);
  d.insert("dec_max_meta", kvtq::kDecMaxMeta);
  d.insert("geom_fields", kGeomFields);
  d.insert("enc_max_spans", kvtq::kMaxEncodeSpans);
  d.insert("cfg_fields", kCfgFields);
  d.insert("err_report_fields", 4);
  return d;
}

int dtype_code(const at::Tensor& t) {
  if (t.scalar_type() == at::kBFloat16) return kvtq::kBF16;
  if (t.scalar_type() == at::kHalf) return kvtq::kFP16;
  KVTQ_CHECK(false, "kvtq: device KV buffers must be bfloat16 or float16, got ", t.scalar_type());
  return -1;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// The address a kernel can dereference: device memory as is, pinned host memory through its mapped
// device address (never assumed equal to the host pointer). Called once per pool, not per transfer.
int64_t mapped_pointer(const at::Tensor& t) {
  if (t.is_cuda()) return reinterpret_cast<int64_t>(t.data_ptr());
  KVTQ_CHECK(t.device().is_cpu(), "kvtq: expected a CUDA tensor or pinned CPU memory");
  void* host = t.data_ptr();
  cudaPointerAttributes attr;
  cudaError_t e = cudaPointerGetAttributes(&attr, host);
  if (e == cudaSuccess && attr.type == cudaMemoryTypeHost && attr.devicePointer != nullptr)
    return reinterpret_cast<int64_t>(attr.devicePointer);
  (void)cudaGetLastError();
  void* dev = nullptr;
  e = cudaHostGetDevicePointer(&dev, host, 0);
  if (e == cudaSuccess && dev != nullptr) return reinterpret_cast<int64_t>(dev);
  (void)cudaGetLastError();
  KVTQ_CHECK(false,
              "kvtq: CPU memory that the GPU cannot map: it must be pinned (cudaHostAlloc / cudaHostRegister, "
              "e.g. tensor.pin_memory())");
  return 0;
}

void check_index(const at::Tensor& t, const char* what) {
  KVTQ_CHECK(t.is_cuda() && t.scalar_type() == at::kLong && t.is_contiguous(), "kvtq: ", what,
              " must be a contiguous CUDA int64 tensor");
}

const int64_t* cpu_fields(const at::Tensor& t, int64_t n, const char* what) {
  KVTQ_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.is_contiguous() && t.numel() == n, "kvtq: ",
              what, " must be a contiguous CPU int64 tensor of ", n, " fields");
  return t.data_ptr<int64_t>();
}

kvtq::ErrorSink error_sink(const at::Tensor& word, int64_t report) {
  KVTQ_CHECK(word.is_cuda() && word.scalar_type() == at::kInt && word.numel() >= 1,
              "kvtq: err_word must be a CUDA int32 tensor");
  KVTQ_CHECK(report != 0, "kvtq: missing error report pointer");
  return kvtq::ErrorSink{word.data_ptr<int32_t>(), reinterpret_cast<int64_t*>(report)};
}

// Optional refinement-plane offsets: a contiguous CUDA int64 [2, n_pages] tensor on `device`, or none.
const int64_t* plane_offsets(const c10::optional<at::Tensor>& t, int64_t n_pages, const at::Device& device,
                             const char* what) {
  if (!t.has_value()) return nullptr;
  const at::Tensor& p = *t;
  KVTQ_CHECK(p.is_cuda() && p.device() == device && p.scalar_type() == at::kLong && p.is_contiguous() && p.dim() == 2 &&
                  p.size(0) == 2 && p.size(1) == n_pages,
              "kvtq: ", what, " must be a contiguous CUDA int64 [2, ", n_pages, "] tensor on ", device);
  return p.data_ptr<int64_t>();
}

// ---- encode ---------------------------------------------------------------------------------------

kvtq::EncodeArgs encode_args(const at::Tensor& chunks, const at::Tensor& unit_chunk, const at::Tensor& ptrs0,
                             const at::Tensor& ptrs1, const at::Tensor& token_index, const at::Tensor& header,
                             const at::Tensor& out, const at::Tensor& geom, const at::Tensor& err_word,
                             const c10::optional<at::Tensor>& plane_dst, int64_t plane_base, int64_t plane_bound) {
  const int64_t* g = cpu_fields(geom, kGeomFields, "geom");
  const int64_t num_layers = g[kGeomLayers], page_size = g[kGeomPageSize], units_per_page = g[kGeomUnitsPerPage];
  check_index(token_index, "token_index");
  KVTQ_CHECK(chunks.is_cuda() && chunks.scalar_type() == at::kInt && chunks.is_contiguous() &&
                  chunks.size(-1) == kvtq::kChunkFields,
              "kvtq: bad chunk table");
  KVTQ_CHECK(unit_chunk.is_cuda() && unit_chunk.scalar_type() == at::kInt && unit_chunk.numel() == units_per_page,
              "kvtq: bad unit table");
  for (const at::Tensor* p : {&ptrs0, &ptrs1})
    KVTQ_CHECK(p->is_cuda() && p->element_size() == 8 && p->is_contiguous() && p->numel() == num_layers &&
                    p->device() == out.device(),
                "kvtq: a pointer table must be a contiguous 64-bit CUDA tensor of num_layers entries on the GPU of out");
  KVTQ_CHECK(header.is_cuda() && header.numel() == 128, "kvtq: bad header");
  KVTQ_CHECK(out.is_cuda() && out.scalar_type() == at::kByte && out.dim() == 2 && out.stride(1) == 1,
              "kvtq: out must be a CUDA uint8 [n_pages, page_bytes] tensor");
  KVTQ_CHECK(token_index.device() == out.device(), "kvtq: token_index and out must be on one GPU");
  KVTQ_CHECK(page_size > 0 && token_index.numel() % page_size == 0, "kvtq: token_index must cover whole pages");
  KVTQ_CHECK(aligned16(out.data_ptr()) && out.stride(0) % 16 == 0, "kvtq: out must be 16-byte aligned");
  KVTQ_CHECK(g[kGeomDType] == kvtq::kBF16 || g[kGeomDType] == kvtq::kFP16, "kvtq: bad dtype code");
  kvtq::EncodeArgs a{};
  a.chunks = reinterpret_cast<const kvtq::ChunkDesc*>(chunks.data_ptr<int32_t>());
  a.unit_chunk = unit_chunk.data_ptr<int32_t>();
  a.ptrs[0] = reinterpret_cast<const uint64_t*>(ptrs0.data_ptr());
  a.ptrs[1] = reinterpret_cast<const uint64_t*>(ptrs1.data_ptr());
  a.token_index = token_index.data_ptr<int64_t>();
  a.header = header.data_ptr<uint8_t>();
  a.out = out.data_ptr<uint8_t>();
  a.out_stride = out.stride(0);
  for (int i = 0; i < 2; ++i) {
    a.row_stride[i] = g[kGeomRowStride0 + i];
    a.head_stride[i] = g[kGeomHeadStride0 + i];
    a.rows[i] = g[kGeomRows0 + i];
  }
  a.err = error_sink(err_word, g[kGeomErrReport]);
  a.num_layers = (int32_t)num_layers;
  a.page_size = (int32_t)page_size;
  a.units_per_page = (int32_t)units_per_page;
  a.n_pages = (int32_t)(token_index.numel() / page_size);
  a.page_base = 0;
  a.unit_base = 0;
  a.n_spans = (int32_t)g[kGeomNumSpans];
  KVTQ_CHECK(a.n_spans >= 1 && a.n_spans <= kvtq::kMaxEncodeSpans, "kvtq: bad encode span count ", a.n_spans);
  int64_t next = 0;
  for (int k = 0; k < a.n_spans; ++k) {  // spans tile [0, units_per_page) in order, one known class each
    const int64_t* f = g + kGeomSpans + 4 * k;
    KVTQ_CHECK(f[0] == next && f[1] > 0 && (f[2] == 0 || f[2] == 1) && (f[3] == 2 || f[3] == 3 || f[3] == 4 || f[3] == 8),
                "kvtq: bad encode span ", k, ": (", f[0], ", ", f[1], ", ", f[2], ", ", f[3], ")");
    a.spans[k] = kvtq::EncodeSpan{(int32_t)f[0], (int32_t)f[1], (int32_t)f[2], (int32_t)f[3]};
    next += f[1];
  }
  KVTQ_CHECK(next == units_per_page, "kvtq: encode spans cover ", next, " of ", units_per_page, " units");
  a.plane_dst = plane_offsets(plane_dst, a.n_pages, out.device(), "plane_dst");
  if (a.plane_dst != nullptr) {
    KVTQ_CHECK(plane_base != 0 && plane_bound > 0 && (plane_base & 15) == 0,
                "kvtq: planes need a 16-byte aligned device-accessible plane_base and a plane_bound");
    a.plane_base = reinterpret_cast<uint8_t*>(plane_base);
    a.plane_n = a.n_pages;
    a.plane_bound = plane_bound;
  }
  return a;
}

void encode(const at::Tensor& chunks, const at::Tensor& unit_chunk, const at::Tensor& ptrs0, const at::Tensor& ptrs1,
            const at::Tensor& token_index, const at::Tensor& header, const at::Tensor& out, const at::Tensor& geom,
            const at::Tensor& err_word, const c10::optional<at::Tensor>& plane_dst, int64_t plane_base,
            int64_t plane_bound) {
  kvtq::EncodeArgs a = encode_args(chunks, unit_chunk, ptrs0, ptrs1, token_index, header, out, geom, err_word,
                                   plane_dst, plane_base, plane_bound);
  KVTQ_CHECK(out.size(0) == a.n_pages, "kvtq: out has ", out.size(0), " pages, token_index ", a.n_pages);
  if (a.n_pages == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  KVTQ_CUDA_OK(kvtq::launch_encode(a, (int)geom.data_ptr<int64_t>()[kGeomDType],
                                   c10::cuda::getCurrentCUDAStream().stream()));
}

// ---- backup ---------------------------------------------------------------------------------------

// The backup side stream of one pool: owned by the Python codec (NativeCodec), released by its
// shutdown() (or when the last reference goes). One event pair per staging slot orders its reuse.
constexpr int kBackupSlots = 16;     // most staging slots one backup cycles through
constexpr int64_t kBackupMinChunk = 4;   // pages per encode launch at least (4 pages: 2-3 waves of blocks)
// Chunks per backup to aim for: more hide more of the encode behind the DMA (only the first chunk's encode
// is exposed) but cost the calling (scheduler) thread a launch, two events and the copies of each chunk
// (run 11, H100: 0.4 ms of host time for a 64-page backup against 1.5 ms on the GPU; docs/benchmarks.md).
constexpr int64_t kBackupChunks = 16;

struct BackupStream : torch::CustomClassHolder {
  int64_t device = -1;
  cudaStream_t stream = nullptr;
  cudaEvent_t encoded[kBackupSlots] = {};
  cudaEvent_t copied[kBackupSlots] = {};
  int used_slots = 0;  // slots whose `copied` event was recorded by some backup (waited on by the next one)
  std::mutex mu;  // one backup at a time per pool (SGLang calls backup from one thread)

  explicit BackupStream(int64_t dev) : device(dev) {
    const c10::cuda::CUDAGuard guard((c10::DeviceIndex)dev);
    KVTQ_CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    for (int i = 0; i < kBackupSlots; ++i) {
      KVTQ_CUDA_OK(cudaEventCreateWithFlags(&encoded[i], cudaEventDisableTiming));
      KVTQ_CUDA_OK(cudaEventCreateWithFlags(&copied[i], cudaEventDisableTiming));
    }
  }
  bool live() const { return stream != nullptr; }
  // Waits for every copy enqueued on the side stream, then destroys the stream and its events.
  void release() {
    const std::lock_guard<std::mutex> lock(mu);
    if (stream == nullptr) return;
    const c10::cuda::CUDAGuard guard((c10::DeviceIndex)device);
    (void)cudaStreamSynchronize(stream);
    for (int i = 0; i < kBackupSlots; ++i) {
      (void)cudaEventDestroy(encoded[i]);
      (void)cudaEventDestroy(copied[i]);
      encoded[i] = copied[i] = nullptr;
    }
    (void)cudaStreamDestroy(stream);
    stream = nullptr;
    (void)cudaGetLastError();
  }
  ~BackupStream() override {
    try {
      release();
    } catch (...) {
    }
  }
};

// Runs of consecutive host page ids: (first position in the batch, length).
std::vector<std::pair<int64_t, int64_t>> id_runs(const int64_t* ids, int64_t n) {
  std::vector<std::pair<int64_t, int64_t>> runs;
  for (int64_t j = 0; j < n;) {
    int64_t r = 1;
    while (j + r < n && ids[j + r] == ids[j] + r) ++r;
    runs.emplace_back(j, r);
    j += r;
  }
  return runs;
}

// Copies of a list of byte ranges (either direction, pinned host <-> device) on `st`: one cudaMemcpyBatchAsync
// (CUDA >= 12.8), else one cudaMemcpyAsync each. Arguments are checked by the callers.
void enqueue_copy_list(std::vector<void*>& dsts, std::vector<const void*>& srcs, std::vector<size_t>& sizes,
                       cudaStream_t st) {
  if (dsts.empty()) return;
#if CUDART_VERSION >= 12080
  cudaMemcpyAttributes attr{};
  attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
  size_t attr_idx = 0;
#if CUDART_VERSION >= 13000
  KVTQ_CUDA_OK(cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), dsts.size(), &attr, &attr_idx, 1, st));
#else
  size_t fail_idx = 0;
  KVTQ_CUDA_OK(cudaMemcpyBatchAsync(dsts.data(), const_cast<void**>(srcs.data()), sizes.data(), dsts.size(), &attr,
                                    &attr_idx, 1, &fail_idx, st));
#endif
#else
  for (size_t e = 0; e < dsts.size(); ++e)
    KVTQ_CUDA_OK(cudaMemcpyAsync(dsts[e], srcs[e], sizes[e], cudaMemcpyDefault, st));
#endif
}

// staging[0:count] -> host_pages[ids[j]] (ids checked by the caller). Run 16 timed one cudaMemcpy2DAsync at about
// 20 us of host time in a one-page backup, so dense rows (pitch == page bytes on both sides, the pools' layout) go as
// one 1-D cudaMemcpyAsync per run of consecutive host ids, and several runs as one cudaMemcpyBatchAsync
// (CUDA >= 12.8); padded rows keep one 2-D copy per run.
void copy_runs(const at::Tensor& staging, int64_t count, const at::Tensor& host_pages, const int64_t* ids,
               cudaStream_t stream) {
  const int64_t pb = staging.size(1);
  const size_t dpitch = (size_t)host_pages.stride(0), spitch = (size_t)staging.stride(0);
  uint8_t* hbase = host_pages.data_ptr<uint8_t>();
  const uint8_t* sbase = staging.data_ptr<uint8_t>();
  const auto runs = id_runs(ids, count);
  if (dpitch == (size_t)pb && spitch == (size_t)pb) {
    if (runs.size() == 1) {
      KVTQ_CUDA_OK(cudaMemcpyAsync(hbase + ids[0] * dpitch, sbase, (size_t)(pb * count), cudaMemcpyDeviceToHost,
                                   stream));
      return;
    }
    std::vector<void*> dsts;
    std::vector<const void*> srcs;
    std::vector<size_t> sizes;
    dsts.reserve(runs.size());
    srcs.reserve(runs.size());
    sizes.reserve(runs.size());
    for (const auto& [j, run] : runs) {
      dsts.push_back(hbase + ids[j] * dpitch);
      srcs.push_back(sbase + j * spitch);
      sizes.push_back((size_t)(pb * run));
    }
    enqueue_copy_list(dsts, srcs, sizes, stream);
    return;
  }
  for (const auto& [j, run] : runs)
    KVTQ_CUDA_OK(cudaMemcpy2DAsync(hbase + ids[j] * dpitch, dpitch, sbase + j * spitch, spitch, (size_t)pb, (size_t)run,
                                   cudaMemcpyDeviceToHost, stream));
}

// The encode arguments of pages [start, start + m) of a batch: their token rows and plane offsets (the plane
// table's row stride stays plane_n); `out` is the caller's to set.
kvtq::EncodeArgs batch_pages(const kvtq::EncodeArgs& a, int64_t start, int64_t m) {
  kvtq::EncodeArgs b = a;
  b.token_index = a.token_index + start * a.page_size;
  if (b.plane_dst != nullptr) b.plane_dst = a.plane_dst + start;
  b.n_pages = (int32_t)m;
  return b;
}

// Pages per encode launch of a backup of n pages through `cap` staging pages (cap >= 2, n >= 2).
int64_t backup_chunk_pages(int64_t n, int64_t cap) {
  const int64_t want = std::max(kBackupMinChunk, (n + kBackupChunks - 1) / kBackupChunks);
  const int64_t by_slots = (cap + kBackupSlots - 1) / kBackupSlots;  // at most kBackupSlots slots
  return std::max<int64_t>(1, std::min(std::max(want, by_slots), std::min(cap / 2, (n + 1) / 2)));
}

// Quantize into `staging` and DMA the pages to their host pages. With two or more staging pages the
// batch is cut into chunks of about n/16 pages (kBackupChunks; at least 4, at most half the staging area) that cycle
// through the staging slots: the kernel encodes chunk k on the current stream while the side stream
// copies chunk k-1, so only the first chunk's encode is not hidden behind the DMA. The current stream
// waits for every copy before this returns, so work queued on it afterwards (and events recorded on it)
// sees the host pages written. Host ids are read and range-checked on the CPU before anything is enqueued.
// Batches of at most `direct_pages` pages skip staging: the kernel writes into the host pages through their
// mapped address `host_base`, on the current stream (same ordering contract). In a batch of at most
// `all_classes_pages` pages every encode launch runs all (axis, bits) classes at once. The codec picks both
// thresholds by batch size (quant/codec.py; benchmark/backup_defaults.py reads them off a sweep).
void backup(const at::Tensor& chunks, const at::Tensor& unit_chunk, const at::Tensor& ptrs0, const at::Tensor& ptrs1,
            const at::Tensor& token_index, const at::Tensor& header, const at::Tensor& staging,
            const at::Tensor& host_pages, const at::Tensor& host_ids, const at::Tensor& geom, const at::Tensor& err_word,
            const c10::intrusive_ptr<BackupStream>& side, const c10::optional<at::Tensor>& plane_dst, int64_t plane_base,
            int64_t plane_bound, int64_t host_base, int64_t direct_pages, int64_t all_classes_pages) {
  // Planes are written by the encode kernel itself, straight into (mapped) host memory: no staging.
  kvtq::EncodeArgs a = encode_args(chunks, unit_chunk, ptrs0, ptrs1, token_index, header, staging, geom, err_word,
                                   plane_dst, plane_base, plane_bound);
  KVTQ_CHECK(host_pages.device().is_cpu() && host_pages.scalar_type() == at::kByte && host_pages.dim() == 2 &&
                  host_pages.stride(1) == 1 && host_pages.size(1) == staging.size(1),
              "kvtq: host_pages must be a CPU uint8 [num_pages, page_bytes] tensor");
  KVTQ_CHECK(host_ids.device().is_cpu() && host_ids.scalar_type() == at::kLong && host_ids.is_contiguous(),
              "kvtq: host page ids must be a contiguous CPU int64 tensor");
  const int64_t n = a.n_pages;
  KVTQ_CHECK(host_ids.numel() == n, "kvtq: ", host_ids.numel(), " host page ids for ", n, " pages");
  KVTQ_CHECK(staging.size(0) > 0, "kvtq: empty staging");
  if (n == 0) return;
  const int64_t* ids = host_ids.data_ptr<int64_t>();
  const int64_t num = host_pages.size(0);
  for (int64_t j = 0; j < n; ++j)  // validate before anything is enqueued
    KVTQ_CHECK(ids[j] >= 0 && ids[j] < num, "kvtq: host page id ", ids[j], " out of range [0, ", num, ")");
  const int dtype = (int)geom.data_ptr<int64_t>()[kGeomDType];
  const c10::cuda::CUDAGuard guard(staging.device());
  const cudaStream_t main = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t cap = staging.size(0);
  const int64_t sstride = staging.stride(0);
  const bool all_classes = n <= all_classes_pages;
  if (n <= direct_pages) {
    // Small batches: the kernel writes each page straight into its host page through the mapped address
    // (host_base, resolved once by the codec), one launch per run of consecutive host ids. No staging, no DMA
    // call: a one-page backup is bound by its launches, not by PCIe (docs/benchmarks.md, run 18).
    const int64_t pitch = host_pages.stride(0);
    KVTQ_CHECK(host_base != 0 && (host_base & 15) == 0 && pitch % 16 == 0,
                "kvtq: a direct backup needs the 16-byte aligned mapped address of the host pages and a pitch of 16");
    for (const auto& [j, run] : id_runs(ids, n)) {
      kvtq::EncodeArgs b = batch_pages(a, j, run);
      b.out = reinterpret_cast<uint8_t*>(host_base) + ids[j] * pitch;
      b.out_stride = pitch;
      KVTQ_CUDA_OK(kvtq::launch_encode(b, dtype, main, all_classes));
    }
    return;
  }
  if (cap < 2 || n == 1) {  // one staging page (or one page): encode and copy in turn on the current stream
    for (int64_t start = 0; start < n; start += cap) {
      const int64_t m = std::min(cap, n - start);
      const kvtq::EncodeArgs b = batch_pages(a, start, m);
      KVTQ_CUDA_OK(kvtq::launch_encode(b, dtype, main, all_classes));
      copy_runs(staging, m, host_pages, ids + start, main);
    }
    return;
  }
  KVTQ_CHECK(side.defined(), "kvtq: backup needs a BackupStream");
  const std::lock_guard<std::mutex> lock(side->mu);
  KVTQ_CHECK(side->stream != nullptr, "kvtq: backup on a released BackupStream (the codec was shut down)");
  KVTQ_CHECK(side->device == staging.device().index(), "kvtq: BackupStream of device ", side->device,
              ", staging on ", staging.device());
  const int64_t chunk = backup_chunk_pages(n, cap);
  const int slots = (int)std::min<int64_t>(kBackupSlots, cap / chunk);
  for (int h = 0; h < side->used_slots; ++h)  // earlier calls' copies out of the slots reused here
    KVTQ_CUDA_OK(cudaStreamWaitEvent(main, side->copied[h], 0));
  int used = 0;
  for (int64_t start = 0, k = 0; start < n; start += chunk, ++k) {
    const int h = (int)(k % slots);
    const int64_t m = std::min(chunk, n - start);
    if (k >= slots) KVTQ_CUDA_OK(cudaStreamWaitEvent(main, side->copied[h], 0));  // this slot's last copy is done
    kvtq::EncodeArgs b = batch_pages(a, start, m);
    b.out = a.out + (int64_t)h * chunk * sstride;
    KVTQ_CUDA_OK(kvtq::launch_encode(b, dtype, main, all_classes));
    KVTQ_CUDA_OK(cudaEventRecord(side->encoded[h], main));
    KVTQ_CUDA_OK(cudaStreamWaitEvent(side->stream, side->encoded[h], 0));
    copy_runs(staging.narrow(0, h * chunk, m), m, host_pages, ids + start, side->stream);
    KVTQ_CUDA_OK(cudaEventRecord(side->copied[h], side->stream));
    used = std::max(used, h + 1);
  }
  for (int h = 0; h < used; ++h) KVTQ_CUDA_OK(cudaStreamWaitEvent(main, side->copied[h], 0));
  side->used_slots = std::max(side->used_slots, used);
}

// ---- staged load: pinned host pages -> GPU staging by the copy engine ------------------------------

// Above this many runs per copy, one batched submission beats a 2-D copy per run (driver call cost).
constexpr size_t kMaxRunsFor2D = 8;
// Up to this many pages the ring submits even consecutive pages as one batch per group: run 12 (H100) timed the
// staged load of scattered pages (batched) faster than that of one run (a 2-D copy per stream and group) at 32-128
// pages (KV4 64 pages 1.565 against 1.756 ms, KV8 2.556 against 2.762) and 3 % slower at 256.
constexpr int64_t kRingBatchMaxPages = 128;

// For every page j < n and every copy row i < k of c = [k][3] (src_off, nbytes, dst_off): host page ids[j]
// (at hbase + ids[j] * spitch) bytes [src_off, src_off + nbytes) -> staging row j (at sbase + j * dpitch)
// at dst_off, enqueued on `st`. Consecutive ids go as one 2-D copy per row and run; scattered ones (or all, with
// `batch`) as one cudaMemcpyBatchAsync (CUDA >= 12.8). Arguments are checked by the callers.
void enqueue_page_copies(const uint8_t* hbase, size_t spitch, const int64_t* ids, int64_t n, uint8_t* sbase,
                         size_t dpitch, const int64_t* c, int64_t k, cudaStream_t st, bool batch = false) {
  if (n == 0 || k == 0) return;
  const auto runs = id_runs(ids, n);
#if CUDART_VERSION >= 12080
  if (batch || runs.size() > kMaxRunsFor2D) {
    const size_t m = (size_t)(n * k);
    std::vector<void*> dsts(m);
    std::vector<const void*> srcs(m);
    std::vector<size_t> sizes(m);
    size_t e = 0;
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = 0; j < n; ++j, ++e) {
        dsts[e] = sbase + j * dpitch + c[3 * i + 2];
        srcs[e] = hbase + ids[j] * spitch + c[3 * i];
        sizes[e] = (size_t)c[3 * i + 1];
      }
    enqueue_copy_list(dsts, srcs, sizes, st);
    return;
  }
#endif
  for (int64_t i = 0; i < k; ++i)
    for (const auto& [j, r] : runs)
      KVTQ_CUDA_OK(cudaMemcpy2DAsync(sbase + j * dpitch + c[3 * i + 2], dpitch, hbase + ids[j] * spitch + c[3 * i],
                                     spitch, (size_t)c[3 * i + 1], (size_t)r, cudaMemcpyHostToDevice, st));
}

// For every page j of the batch and every row (src_off, nbytes, dst_off) of `copies`: host page
// host_ids[j] bytes [src_off, src_off + nbytes) -> staging row j bytes [dst_off, dst_off + nbytes), on
// `stream` (a cudaStream_t; 0 = the current stream), by enqueue_page_copies. Everything is checked on the
// host before anything is enqueued. The copies read host_pages asynchronously: the caller keeps them in place
// until the stream has run.
void stage_copies(const at::Tensor& host_pages, const at::Tensor& host_ids, const at::Tensor& staging,
                  const at::Tensor& copies, int64_t stream) {
  KVTQ_CHECK(host_pages.device().is_cpu() && host_pages.scalar_type() == at::kByte && host_pages.dim() == 2 &&
                  host_pages.stride(1) == 1,
              "kvtq: host_pages must be a CPU uint8 [num_pages, page_bytes] tensor");
  KVTQ_CHECK(host_ids.device().is_cpu() && host_ids.scalar_type() == at::kLong && host_ids.is_contiguous(),
              "kvtq: host page ids must be a contiguous CPU int64 tensor");
  KVTQ_CHECK(staging.is_cuda() && staging.scalar_type() == at::kByte && staging.dim() == 2 && staging.stride(1) == 1,
              "kvtq: staging must be a CUDA uint8 [pages, pitch] tensor");
  KVTQ_CHECK(copies.device().is_cpu() && copies.scalar_type() == at::kLong && copies.is_contiguous() &&
                  copies.dim() == 2 && copies.size(1) == 3,
              "kvtq: copies must be a contiguous CPU int64 [rows, 3] tensor (src_off, nbytes, dst_off)");
  const int64_t n = host_ids.numel();
  KVTQ_CHECK(n <= staging.size(0), "kvtq: ", n, " pages for a staging area of ", staging.size(0));
  const int64_t* ids = host_ids.data_ptr<int64_t>();
  const int64_t num = host_pages.size(0);
  for (int64_t j = 0; j < n; ++j)
    KVTQ_CHECK(ids[j] >= 0 && ids[j] < num, "kvtq: host page id ", ids[j], " out of range [0, ", num, ")");
  const int64_t k = copies.size(0);
  const int64_t* c = copies.data_ptr<int64_t>();
  for (int64_t i = 0; i < k; ++i)
    KVTQ_CHECK(c[3 * i] >= 0 && c[3 * i + 1] >= 0 && c[3 * i + 2] >= 0 && c[3 * i] + c[3 * i + 1] <= host_pages.size(1) &&
                    c[3 * i + 2] + c[3 * i + 1] <= staging.size(1),
                "kvtq: copy row ", i, " (", c[3 * i], ", ", c[3 * i + 1], ", ", c[3 * i + 2], ") outside a host page of ",
                host_pages.size(1), " B or a staging row of ", staging.size(1), " B");
  if (n == 0 || k == 0) return;
  const c10::cuda::CUDAGuard guard(staging.device());
  const cudaStream_t st =
      stream != 0 ? reinterpret_cast<cudaStream_t>(stream) : c10::cuda::getCurrentCUDAStream().stream();
  enqueue_page_copies(host_pages.data_ptr<uint8_t>(), (size_t)host_pages.stride(0), ids, n, staging.data_ptr<uint8_t>(),
                      (size_t)staging.stride(0), c, k, st);
}

// ---- decode ---------------------------------------------------------------------------------------

// The launch arguments of one layer, index tensors left out: desc = this layer's CPU int64
// [nstreams, kDecodeFields] descriptor, c = the pool's cfg fields, dst0/dst1 = the layer's device buffers
// (the same tensor twice for MLA). Every check of a decode call that does not depend on the indices.
kvtq::DecodeArgs layer_args(const int64_t* d, int64_t nstreams, const int64_t* c, const at::Tensor& dst0,
                            const at::Tensor& dst1, const at::Tensor& err_word) {
  KVTQ_CHECK(nstreams >= 1 && nstreams <= 2, "kvtq: bad decode descriptor");
  KVTQ_CHECK(dst0.is_cuda() && dst1.is_cuda() && dst0.dim() == 3 && dst1.dim() == 3 && dst0.stride(2) == 1 &&
                  dst1.stride(2) == 1 && dst0.scalar_type() == dst1.scalar_type() && dst1.device() == dst0.device(),
              "kvtq: device buffers must be CUDA [rows, heads, dim] tensors on one GPU with a contiguous last dim");
  kvtq::DecodeArgs a{};
  a.nstreams = (int32_t)nstreams;
  int64_t upp = 0;
  const at::Tensor* dsts[2] = {&dst0, &dst1};
  for (int s = 0; s < a.nstreams; ++s) {
    std::memcpy(&a.st[s], d + s * kvtq::kDecodeFields, sizeof(kvtq::DecodeStream));
    const kvtq::DecodeStream& S = a.st[s];
    KVTQ_CHECK(S.buffer == 0 || S.buffer == 1, "kvtq: bad stream buffer ", S.buffer);
    const at::Tensor& t = *dsts[S.buffer];
    KVTQ_CHECK(t.size(1) == S.heads && t.size(2) >= S.col_off + S.dim, "kvtq: device buffer ", S.buffer, " has shape ",
                t.sizes(), ", the layout wants ", S.heads, " heads x ", S.col_off + S.dim, " columns");
    upp += S.units;
  }
  for (int b = 0; b < 2; ++b) {
    const at::Tensor& t = *dsts[b];
    KVTQ_CHECK(t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 && aligned16(t.data_ptr()),
                "kvtq: device rows must be 16-byte aligned");
    a.dst[b] = t.data_ptr();
    a.row_stride[b] = t.stride(0);
    a.head_stride[b] = t.stride(1);
    a.rows[b] = t.size(0);
  }
  a.pages = reinterpret_cast<const uint8_t*>(c[kCfgPagesPtr]);
  a.page_stride = c[kCfgPageStride];
  a.num_pages = c[kCfgNumPages];
  KVTQ_CHECK(a.pages != nullptr && aligned16(a.pages) && a.page_stride % 16 == 0, "kvtq: pages must be 16-byte aligned");
  a.page_size = (int32_t)c[kCfgPageSize];
  a.units_per_page = (int32_t)upp;
  a.smem_codes = (int32_t)c[kCfgSmemCodes];
  a.smem_meta = (int32_t)c[kCfgSmemMeta];
  a.err = error_sink(err_word, c[kCfgErrReport]);
  return a;
}

void check_decode_indices(const at::Tensor& page_ids, const at::Tensor& token_index, int64_t page_size,
                          const at::Device& device) {
  check_index(page_ids, "page_ids");
  check_index(token_index, "token_index");
  KVTQ_CHECK(token_index.numel() == page_ids.numel() * page_size, "kvtq: token_index must hold page_size rows per page");
  KVTQ_CHECK(page_ids.device() == device && token_index.device() == device,
              "kvtq: page_ids, token_index and the device buffers must be on one GPU");
}

// One layer: desc = CPU int64 [nstreams, kDecodeFields] (this layer's streams), cfg = CPU int64
// [kCfgFields] (pool constants, resolved once). dst0/dst1 = this layer's device buffers (the same
// tensor twice for MLA). page_ids and token_index are range-checked in the kernel.
void decode(const at::Tensor& desc, const at::Tensor& cfg, const at::Tensor& page_ids, const at::Tensor& token_index,
            const at::Tensor& dst0, const at::Tensor& dst1, const at::Tensor& err_word,
            const c10::optional<at::Tensor>& plane_src) {
  KVTQ_CHECK(desc.device().is_cpu() && desc.scalar_type() == at::kLong && desc.is_contiguous() && desc.dim() == 2 &&
                  desc.size(1) == kvtq::kDecodeFields,
              "kvtq: bad decode descriptor");
  const int64_t* c = cpu_fields(cfg, kCfgFields, "decode cfg");
  kvtq::DecodeArgs a = layer_args(desc.data_ptr<int64_t>(), desc.size(0), c, dst0, dst1, err_word);
  check_decode_indices(page_ids, token_index, a.page_size, dst0.device());
  const int64_t n_pages = page_ids.numel();
  if (n_pages == 0) return;
  a.page_ids = page_ids.data_ptr<int64_t>();
  a.token_index = token_index.data_ptr<int64_t>();
  a.n_pages = (int32_t)n_pages;
  a.plane_src = plane_offsets(plane_src, n_pages, dst0.device(), "plane_src");
  const c10::cuda::CUDAGuard guard(dst0.device());
  KVTQ_CUDA_OK(kvtq::launch_decode(a, dtype_code(dst0), (int)c[kCfgBlocks], c10::cuda::getCurrentCUDAStream().stream()));
}

// ---- decode of every layer in one launch (small loads are launch-bound) --------------------------

// Field order of the CPU int64 `info` tensor that decode_table returns next to the table.
enum LayersInfo : int { kInfoLayers, kInfoMaxUnitsPerPage, kInfoDType, kInfoArgBytes, kInfoDevice, kInfoFields };

// The per-layer launch arguments of every layer (desc = CPU int64 [L, nstreams, kDecodeFields]), as a
// device uint8 table [L, sizeof(DecodeArgs)] for decode_layers, and its CPU int64 info [kInfoFields].
// The table holds the layer tensors' addresses: the caller rebuilds it when a layer tensor is replaced.
std::tuple<at::Tensor, at::Tensor> decode_table(const at::Tensor& desc, const at::Tensor& cfg, at::TensorList dst0,
                                                at::TensorList dst1, const at::Tensor& err_word) {
  KVTQ_CHECK(desc.device().is_cpu() && desc.scalar_type() == at::kLong && desc.is_contiguous() && desc.dim() == 3 &&
                  desc.size(2) == kvtq::kDecodeFields,
              "kvtq: decode_table wants a CPU int64 [layers, streams, ", kvtq::kDecodeFields, "] descriptor");
  const int64_t L = desc.size(0);
  KVTQ_CHECK(L >= 1 && (int64_t)dst0.size() == L && (int64_t)dst1.size() == L,
              "kvtq: decode_table wants one device tensor per layer and buffer");
  const int64_t* c = cpu_fields(cfg, kCfgFields, "decode cfg");
  const int64_t row = (int64_t)sizeof(kvtq::DecodeArgs);
  at::Tensor host = at::empty({L, row}, at::TensorOptions().dtype(at::kByte));
  int64_t max_upp = 0;
  const int dt = dtype_code(dst0[0]);
  for (int64_t l = 0; l < L; ++l) {
    KVTQ_CHECK(dst0[l].device() == dst0[0].device() && dtype_code(dst0[l]) == dt,
                "kvtq: every layer's device buffers must share one GPU and dtype");
    const kvtq::DecodeArgs a =
        layer_args(desc.data_ptr<int64_t>() + l * desc.size(1) * kvtq::kDecodeFields, desc.size(1), c, dst0[l], dst1[l], err_word);
    max_upp = std::max<int64_t>(max_upp, a.units_per_page);
    std::memcpy(host.data_ptr<uint8_t>() + l * row, &a, sizeof(a));
  }
  at::Tensor info = at::empty({kInfoFields}, at::TensorOptions().dtype(at::kLong));
  int64_t* f = info.data_ptr<int64_t>();
  f[kInfoLayers] = L;
  f[kInfoMaxUnitsPerPage] = max_upp;
  f[kInfoDType] = dt;
  f[kInfoArgBytes] = row;
  f[kInfoDevice] = dst0[0].device().index();
  return {host.to(dst0[0].device()), info};
}

// Every layer of a load in one launch: the table and info of decode_table, the load's indices.
// blocks_per_layer bounds each layer's share of the grid (<= 0: one block per unit).
void decode_layers(const at::Tensor& table, const at::Tensor& info, const at::Tensor& cfg, const at::Tensor& page_ids,
                   const at::Tensor& token_index, const at::Tensor& err_word, int64_t blocks_per_layer,
                   const c10::optional<at::Tensor>& plane_src) {
  const int64_t* f = cpu_fields(info, kInfoFields, "decode_layers info");
  const int64_t* c = cpu_fields(cfg, kCfgFields, "decode cfg");
  KVTQ_CHECK(f[kInfoArgBytes] == (int64_t)sizeof(kvtq::DecodeArgs) && table.is_cuda() && table.is_contiguous() &&
                  table.scalar_type() == at::kByte && table.numel() == f[kInfoLayers] * f[kInfoArgBytes] &&
                  table.device().index() == f[kInfoDevice],
              "kvtq: decode_layers table does not match its info (rebuild it with decode_table)");
  check_decode_indices(page_ids, token_index, c[kCfgPageSize], table.device());
  KVTQ_CHECK(err_word.is_cuda() && err_word.device() == table.device(), "kvtq: err_word must be on the table's GPU");
  const int64_t n_pages = page_ids.numel();
  if (n_pages == 0) return;
  const int64_t* planes = plane_offsets(plane_src, n_pages, table.device(), "plane_src");
  const c10::cuda::CUDAGuard guard(table.device());
  KVTQ_CUDA_OK(kvtq::launch_decode_layers(reinterpret_cast<const kvtq::DecodeArgs*>(table.data_ptr()),
                                          (int)f[kInfoLayers], (int)f[kInfoMaxUnitsPerPage],
                                          page_ids.data_ptr<int64_t>(), token_index.data_ptr<int64_t>(), planes, n_pages,
                                          (int)c[kCfgSmemCodes], (int)c[kCfgSmemMeta], (int)f[kInfoDType],
                                          (int)blocks_per_layer, c10::cuda::getCurrentCUDAStream().stream()));
}

// ---- staged load ring: a whole load's copies and decodes, enqueued from C++ --------------------------

// The staged load of one pool (quant/staged_load.py owns it; the contract is in its docstring). A load of n
// pages cuts the layers into G copy groups; the staging area (bytes) holds S = min(G, bytes / (n * pitch))
// group slots of n rows of `pitch` bytes. begin() enqueues the copies of the first S groups on the ring's
// own stream; layer(l) decodes layer l from its group's slot on the caller's current stream, and after the
// last layer of group g enqueues the copies of group g + S into the slot g's decodes just released. So a
// load that fits the staging area whole (S = G) has every copy in flight from layer 0, and the copy engine
// never waits for the calling thread. Per layer, the caller pays one call into C++: no tensor arguments,
// no Python-side event or stream objects (run 11: the Python version cost 40 us of host time per layer).
// Ordering: a slot's next copy waits (on the GPU) for the decodes of the group that used it; a new load's
// first copies wait for the previous load's last decode (or for everything its caller had enqueued when it
// stopped early). Host pages are read asynchronously: the owner keeps them in place until the caller's
// stream has run the load.
// Elastic loads: with `planes` (CPU int64 [2, n], a page's refinement-plane byte offset in the host buffer per
// stream, -1: none), each group's copies also bring the group's refinement codes of every page that has
// them into the staging row (plane_copies: where), and the decodes read them from there.
struct StagedRing : torch::CustomClassHolder {
  int64_t device = -1;
  cudaStream_t stream = nullptr;
  std::vector<cudaEvent_t> staged, decoded;  // per group: its copies landed / its decodes are done
  cudaEvent_t done = nullptr;                // the previous load's decodes are done
  bool have_done = false;
  at::Tensor staging, host_pages, local_ids;
  std::vector<int64_t> copies;                // [G][k][3]: (src_off, nbytes, dst_off) per stream of a group
  int64_t copy_rows = 0;                      // k
  std::vector<int64_t> plane_copies;          // [G][2][3]: (offset in the stream's plane, nbytes, dst_off)
  int64_t plane_end[2] = {0, 0};              // bytes of each stream's plane that a load copies (0: none)
  at::Tensor plane_dev;                       // CUDA int64 [2 * max_pages]: the decodes' plane offsets
  std::vector<int32_t> group_of, group_first, group_last;
  int64_t pitch = 0, max_pages = 0;
  std::vector<kvtq::DecodeArgs> args;         // per layer; the index fields are filled per load
  int dtype = kvtq::kBF16;
  // the load in flight
  std::vector<int64_t> ids;
  std::vector<int64_t> plane_offs;  // [2][n] host offsets of the load's planes (empty: none)
  at::Tensor rows;
  int64_t n = 0, slots = 0;
  int64_t next = -1;  // the layer it expects next; -1: none in flight
  std::mutex mu;

  // staging: CUDA uint8 (any shape, contiguous); host_pages: pinned CPU uint8 [num_pages, page_bytes];
  // copies: CPU int64 [G, k, 3]; group_first: CPU int64 [G + 1], the first layer of each group and L;
  // plane_copies_: CPU int64 [G, 2, 3] (all nbytes 0 for a pool without refinement planes).
  StagedRing(int64_t dev, const at::Tensor& staging_, const at::Tensor& host_pages_, const at::Tensor& copies_,
             const at::Tensor& group_first_, const at::Tensor& plane_copies_, int64_t pitch_, int64_t max_pages_)
      : device(dev), staging(staging_), host_pages(host_pages_), pitch(pitch_), max_pages(max_pages_) {
    KVTQ_CHECK(staging.is_cuda() && staging.device().index() == dev && staging.scalar_type() == at::kByte &&
                    staging.is_contiguous() && aligned16(staging.data_ptr()),
                "kvtq: ring staging must be a contiguous, aligned CUDA uint8 tensor on device ", dev);
    KVTQ_CHECK(host_pages.device().is_cpu() && host_pages.scalar_type() == at::kByte && host_pages.dim() == 2 &&
                    host_pages.stride(1) == 1,
                "kvtq: host_pages must be a CPU uint8 [num_pages, page_bytes] tensor");
    KVTQ_CHECK(copies_.device().is_cpu() && copies_.scalar_type() == at::kLong && copies_.is_contiguous() &&
                    copies_.dim() == 3 && copies_.size(2) == 3 && copies_.size(0) >= 1,
                "kvtq: ring copies must be a contiguous CPU int64 [groups, rows, 3] tensor");
    const int64_t G = copies_.size(0);
    KVTQ_CHECK(group_first_.device().is_cpu() && group_first_.scalar_type() == at::kLong &&
                    group_first_.is_contiguous() && group_first_.numel() == G + 1,
                "kvtq: ring group_first must be a CPU int64 tensor of groups + 1 entries");
    KVTQ_CHECK(pitch > 0 && pitch % 16 == 0 && max_pages >= 1 && staging.numel() >= 2 * max_pages * pitch,
                "kvtq: ring staging of ", staging.numel(), " B cannot hold two groups of ", max_pages, " rows of ",
                pitch, " B (pitch a multiple of 16)");
    copy_rows = copies_.size(1);
    const int64_t* c = copies_.data_ptr<int64_t>();
    copies.assign(c, c + copies_.numel());
    for (int64_t i = 0; i < G * copy_rows; ++i)
      KVTQ_CHECK(c[3 * i] >= 0 && c[3 * i + 1] >= 0 && c[3 * i + 2] >= 0 &&
                      c[3 * i] + c[3 * i + 1] <= host_pages.size(1) && c[3 * i + 2] + c[3 * i + 1] <= pitch,
                  "kvtq: ring copy row ", i, " outside a host page of ", host_pages.size(1), " B or a row of ", pitch,
                  " B");
    KVTQ_CHECK(plane_copies_.device().is_cpu() && plane_copies_.scalar_type() == at::kLong &&
                    plane_copies_.is_contiguous() && plane_copies_.dim() == 3 && plane_copies_.size(0) == G &&
                    plane_copies_.size(1) == 2 && plane_copies_.size(2) == 3,
                "kvtq: ring plane_copies must be a contiguous CPU int64 [groups, 2, 3] tensor");
    const int64_t* pc = plane_copies_.data_ptr<int64_t>();
    plane_copies.assign(pc, pc + plane_copies_.numel());
    for (int64_t i = 0; i < G * 2; ++i) {
      KVTQ_CHECK(pc[3 * i] >= 0 && pc[3 * i + 1] >= 0 && pc[3 * i + 2] >= 0 && pc[3 * i + 2] + pc[3 * i + 1] <= pitch,
                  "kvtq: ring plane copy row ", i, " outside a row of ", pitch, " B");
      if (pc[3 * i + 1] > 0) plane_end[i % 2] = std::max(plane_end[i % 2], pc[3 * i] + pc[3 * i + 1]);
    }
    const int64_t* f = group_first_.data_ptr<int64_t>();
    KVTQ_CHECK(f[0] == 0, "kvtq: ring groups must start at layer 0");
    for (int64_t g = 0; g < G; ++g) {
      KVTQ_CHECK(f[g + 1] > f[g], "kvtq: ring groups must be non-empty and ordered");
      group_first.push_back((int32_t)f[g]);
      group_last.push_back((int32_t)f[g + 1] - 1);
      for (int64_t l = f[g]; l < f[g + 1]; ++l) group_of.push_back((int32_t)g);
    }
    const c10::cuda::CUDAGuard guard((c10::DeviceIndex)dev);
    local_ids = at::arange(max_pages, at::TensorOptions().dtype(at::kLong).device(staging.device()));
    if (plane_end[0] > 0 || plane_end[1] > 0)
      plane_dev = at::empty({2 * max_pages}, at::TensorOptions().dtype(at::kLong).device(staging.device()));
    KVTQ_CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    staged.assign(G, nullptr);
    decoded.assign(G, nullptr);
    for (int64_t g = 0; g < G; ++g) {
      KVTQ_CUDA_OK(cudaEventCreateWithFlags(&staged[g], cudaEventDisableTiming));
      KVTQ_CUDA_OK(cudaEventCreateWithFlags(&decoded[g], cudaEventDisableTiming));
    }
    KVTQ_CUDA_OK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
  }

  int64_t num_layers() const { return (int64_t)group_of.size(); }

  // The decode arguments of every layer: desc = CPU int64 [L, streams, kDecodeFields] (chunk offsets in a
  // staging row), cfg = the decode cfg of a staging row, dst0/dst1 = the layer tensors. Called by the owner
  // before the first load and whenever a layer tensor is replaced (the arguments hold their addresses).
  void set_layers(const at::Tensor& desc, const at::Tensor& cfg, std::vector<at::Tensor> dst0,
                  std::vector<at::Tensor> dst1, const at::Tensor& err_word) {
    const std::lock_guard<std::mutex> lock(mu);
    KVTQ_CHECK(desc.device().is_cpu() && desc.scalar_type() == at::kLong && desc.is_contiguous() && desc.dim() == 3 &&
                    desc.size(0) == num_layers() && desc.size(2) == kvtq::kDecodeFields,
                "kvtq: set_layers wants a CPU int64 [", num_layers(), ", streams, ", kvtq::kDecodeFields,
                "] descriptor");
    KVTQ_CHECK((int64_t)dst0.size() == num_layers() && (int64_t)dst1.size() == num_layers(),
                "kvtq: set_layers wants one device tensor per layer and buffer");
    const int64_t* c = cpu_fields(cfg, kCfgFields, "decode cfg");
    std::vector<kvtq::DecodeArgs> a;
    const int dt = dtype_code(dst0[0]);
    for (int64_t l = 0; l < num_layers(); ++l) {
      KVTQ_CHECK(dst0[l].device() == staging.device() && dtype_code(dst0[l]) == dt,
                  "kvtq: every layer's device buffers must be on the staging GPU, of one dtype");
      a.push_back(layer_args(desc.data_ptr<int64_t>() + l * desc.size(1) * kvtq::kDecodeFields, desc.size(1), c,
                             dst0[l], dst1[l], err_word));
    }
    const c10::cuda::CUDAGuard guard(staging.device());
    close_stopped_load(c10::cuda::getCurrentCUDAStream().stream());
    args = std::move(a);
    dtype = dt;
  }

  // A load whose later layers never came (SGLang's layer cap): its enqueued decodes, everything on `cur`
  // so far, still read the slots, so the next load's copies wait for them.
  void close_stopped_load(cudaStream_t cur) {
    if (next < 0) return;
    KVTQ_CUDA_OK(cudaEventRecord(done, cur));
    have_done = true;
    next = -1;
    rows = at::Tensor();
  }

  // The copies of group g into its slot, after the decodes that last read that slot in this load.
  void enqueue_group(int64_t g) {
    const int64_t slot = g % slots;
    if (g >= slots) KVTQ_CUDA_OK(cudaStreamWaitEvent(stream, decoded[g - slots], 0));
    uint8_t* base = staging.data_ptr<uint8_t>() + slot * n * pitch;
    const uint8_t* hbase = host_pages.data_ptr<uint8_t>();
    enqueue_page_copies(hbase, (size_t)host_pages.stride(0), ids.data(), n, base, (size_t)pitch,
                        copies.data() + g * copy_rows * 3, copy_rows, stream, n <= kRingBatchMaxPages);
    if (!plane_offs.empty()) {  // the group's refinement codes of every page that has them
      std::vector<void*> dsts;
      std::vector<const void*> srcs;
      std::vector<size_t> sizes;
      for (int st = 0; st < 2; ++st) {
        const int64_t* pc = plane_copies.data() + (g * 2 + st) * 3;
        if (pc[1] == 0) continue;
        for (int64_t j = 0; j < n; ++j) {
          const int64_t off = plane_offs[st * n + j];
          if (off < 0) continue;
          dsts.push_back(base + j * pitch + pc[2]);
          srcs.push_back(hbase + off + pc[0]);
          sizes.push_back((size_t)pc[1]);
        }
      }
      enqueue_copy_list(dsts, srcs, sizes, stream);
    }
    KVTQ_CUDA_OK(cudaEventRecord(staged[g], stream));
  }

  // A load of cpu_ids (CPU int64, n <= max_pages) into the device rows `rows_` (CUDA int64 [n * page_size]),
  // with the pages' refinement planes where `planes` (CPU int64 [2, n]) gives them. Returns the number of
  // group slots it uses. Everything is checked before anything is enqueued.
  int64_t begin(const at::Tensor& cpu_ids, const at::Tensor& rows_, const c10::optional<at::Tensor>& planes) {
    const std::lock_guard<std::mutex> lock(mu);
    KVTQ_CHECK(stream != nullptr, "kvtq: staged load on a released ring");
    KVTQ_CHECK(!args.empty(), "kvtq: staged load before set_layers");
    KVTQ_CHECK(cpu_ids.device().is_cpu() && cpu_ids.scalar_type() == at::kLong && cpu_ids.is_contiguous(),
                "kvtq: host page ids must be a contiguous CPU int64 tensor");
    const int64_t m = cpu_ids.numel();
    KVTQ_CHECK(m >= 1 && m <= max_pages, "kvtq: a staged load of ", m, " pages (the ring takes 1..", max_pages, ")");
    const int64_t* p = cpu_ids.data_ptr<int64_t>();
    const int64_t num = host_pages.size(0);
    for (int64_t j = 0; j < m; ++j)
      KVTQ_CHECK(p[j] >= 0 && p[j] < num, "kvtq: host page id ", p[j], " out of range [0, ", num, ")");
    check_index(rows_, "token_index");
    KVTQ_CHECK(rows_.device() == staging.device() && rows_.numel() == m * args[0].page_size,
                "kvtq: token_index must hold page_size rows per page, on the staging GPU");
    std::vector<int64_t> poffs, pdev;
    if (planes.has_value()) {
      const at::Tensor& pl = *planes;
      KVTQ_CHECK(pl.device().is_cpu() && pl.scalar_type() == at::kLong && pl.is_contiguous() && pl.dim() == 2 &&
                      pl.size(0) == 2 && pl.size(1) == m,
                  "kvtq: planes must be a contiguous CPU int64 [2, ", m, "] tensor");
      const int64_t* q = pl.data_ptr<int64_t>();
      const int64_t host_bytes = num * host_pages.stride(0);
      poffs.assign(q, q + 2 * m);
      pdev.assign(2 * m, -1);
      for (int st = 0; st < 2; ++st)
        for (int64_t j = 0; j < m; ++j) {
          const int64_t off = q[st * m + j];
          if (off < 0) continue;
          KVTQ_CHECK(plane_end[st] > 0, "kvtq: planes give stream ", st, " a refinement plane; this ring has none");
          KVTQ_CHECK(off <= host_bytes - plane_end[st], "kvtq: refinement plane offset ", off, " + ", plane_end[st],
                      " B outside the host buffer (", host_bytes, " B)");
          pdev[st * m + j] = j * pitch;  // the decodes find the codes at plane_off of the page's staging row
        }
    }
    const c10::cuda::CUDAGuard guard(staging.device());
    const cudaStream_t cur = c10::cuda::getCurrentCUDAStream().stream();
    close_stopped_load(cur);
    if (have_done) KVTQ_CUDA_OK(cudaStreamWaitEvent(stream, done, 0));
    const int64_t G = (int64_t)group_first.size();
    if (!poffs.empty())  // pageable source: staged by the driver before the call returns
      KVTQ_CUDA_OK(cudaMemcpyAsync(plane_dev.data_ptr<int64_t>(), pdev.data(), pdev.size() * sizeof(int64_t),
                                   cudaMemcpyHostToDevice, cur));
    plane_offs = std::move(poffs);
    ids.assign(p, p + m);
    n = m;
    rows = rows_;
    slots = std::min<int64_t>(G, staging.numel() / (m * pitch));
    next = 0;
    for (int64_t g = 0; g < slots; ++g) enqueue_group(g);
    return slots;
  }

  // Decode `layer` (the next one of the load in flight) on the caller's current stream.
  void layer(int64_t l) {
    const std::lock_guard<std::mutex> lock(mu);
    KVTQ_CHECK(next >= 0 && l == next, "kvtq: the staged load expected layer ", next, ", got ", l);
    const c10::cuda::CUDAGuard guard(staging.device());
    const cudaStream_t cur = c10::cuda::getCurrentCUDAStream().stream();
    const int64_t g = group_of[l];
    if (l == group_first[g]) KVTQ_CUDA_OK(cudaStreamWaitEvent(cur, staged[g], 0));
    kvtq::DecodeArgs a = args[l];
    a.pages = staging.data_ptr<uint8_t>() + (g % slots) * n * pitch;
    a.page_stride = pitch;
    a.num_pages = n;
    a.page_ids = local_ids.data_ptr<int64_t>();
    a.token_index = rows.data_ptr<int64_t>();
    a.n_pages = (int32_t)n;
    a.plane_src = plane_offs.empty() ? nullptr : plane_dev.data_ptr<int64_t>();
    KVTQ_CUDA_OK(kvtq::launch_decode(a, dtype, 0, cur));
    if (l == group_last[g]) {
      KVTQ_CUDA_OK(cudaEventRecord(decoded[g], cur));
      if (g + slots < (int64_t)group_first.size()) enqueue_group(g + slots);
    }
    next = l + 1;
    if (next == num_layers()) {
      KVTQ_CUDA_OK(cudaEventRecord(done, cur));
      have_done = true;
      next = -1;
      rows = at::Tensor();
    }
  }

  // Waits for the ring's copies, then destroys its stream and events (idempotent).
  void release() {
    const std::lock_guard<std::mutex> lock(mu);
    if (stream == nullptr) return;
    const c10::cuda::CUDAGuard guard((c10::DeviceIndex)device);
    (void)cudaStreamSynchronize(stream);
    for (auto* v : {&staged, &decoded})
      for (cudaEvent_t& e : *v) {
        (void)cudaEventDestroy(e);
        e = nullptr;
      }
    (void)cudaEventDestroy(done);
    done = nullptr;
    (void)cudaStreamDestroy(stream);
    stream = nullptr;
    next = -1;
    rows = at::Tensor();
    (void)cudaGetLastError();
  }
  bool live() const { return stream != nullptr; }
  ~StagedRing() override {
    try {
      release();
    } catch (...) {
    }
  }
};

}  // namespace

TORCH_LIBRARY(kvtq, m) {
  m.class_<BackupStream>("BackupStream")
      .def(torch::init<int64_t>())
      .def("release", &BackupStream::release)
      .def("live", &BackupStream::live);
  m.class_<StagedRing>("StagedRing")
      .def(torch::init<int64_t, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, int64_t, int64_t>())
      .def("set_layers", &StagedRing::set_layers)
      .def("begin", &StagedRing::begin)
      .def("layer", &StagedRing::layer)
      .def("release", &StagedRing::release)
      .def("live", &StagedRing::live);
  m.def("abi_stamp() -> str", &abi_stamp);
  m.def("limits() -> Dict(str, int)", &limits);
  m.def("mapped_pointer(Tensor t) -> int", &mapped_pointer);
  m.def("encode(Tensor chunks, Tensor unit_chunk, Tensor ptrs0, Tensor ptrs1, Tensor token_index, Tensor header, "
        "Tensor(a!) out, Tensor geom, Tensor(b!) err_word, Tensor? plane_dst=None, int plane_base=0, "
        "int plane_bound=0) -> ()");
  m.def("backup(Tensor chunks, Tensor unit_chunk, Tensor ptrs0, Tensor ptrs1, Tensor token_index, Tensor header, "
        "Tensor(a!) staging, Tensor(b!) host_pages, Tensor host_ids, Tensor geom, Tensor(c!) err_word, "
        "__torch__.torch.classes.kvtq.BackupStream side, Tensor? plane_dst=None, int plane_base=0, "
        "int plane_bound=0, int host_base=0, int direct_pages=0, int all_classes_pages=0) -> ()");
  m.def("decode(Tensor desc, Tensor cfg, Tensor page_ids, Tensor token_index, Tensor(a!) dst0, Tensor(b!) dst1, "
        "Tensor(c!) err_word, Tensor? plane_src=None) -> ()");
  // CPU pages and ids, a CUDA staging tensor: one kernel for every backend (it checks the devices itself)
  m.def("stage_copies(Tensor host_pages, Tensor host_ids, Tensor(a!) staging, Tensor copies, int stream) -> ()",
        &stage_copies);
  m.def("decode_table(Tensor desc, Tensor cfg, Tensor[] dst0, Tensor[] dst1, Tensor err_word) -> (Tensor, Tensor)");
  // Writes the device rows of every layer through the table's addresses (eager only: the writes are
  // not visible to the schema; the load path that calls it is not compiled).
  m.def("decode_layers(Tensor table, Tensor info, Tensor cfg, Tensor page_ids, Tensor token_index, "
        "Tensor(a!) err_word, int blocks_per_layer, Tensor? plane_src=None) -> ()");
}

TORCH_LIBRARY_IMPL(kvtq, CUDA, m) {
  m.impl("encode", &encode);
  m.impl("backup", &backup);
  m.impl("decode", &decode);
  m.impl("decode_table", &decode_table);
  m.impl("decode_layers", &decode_layers);
}
