// Torch bindings of the quantized HiCache page codec (kvtq_kernels.cu). Loaded by
// python/kvtuner_hicache/quant/native.py through torch.utils.cpp_extension.load.
#include <torch/extension.h>
#include <pybind11/stl.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "kvtq_kernels.h"

namespace {

#define KVTQ_CUDA_OK(expr)                                                                     \
  do {                                                                                         \
    const cudaError_t _e = (expr);                                                             \
    TORCH_CHECK(_e == cudaSuccess, "kvtq: ", #expr, " failed: ", cudaGetErrorString(_e));      \
  } while (0)

int dtype_code(const at::Tensor& t) {
  if (t.scalar_type() == at::kBFloat16) return kvtq::kBF16;
  if (t.scalar_type() == at::kHalf) return kvtq::kFP16;
  TORCH_CHECK(false, "kvtq: device KV buffers must be bfloat16 or float16, got ", t.scalar_type());
  return -1;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// A pointer a kernel can dereference: device memory as is, pinned host memory through its
// mapped device address (do not assume host pointer == device pointer).
uint8_t* kernel_ptr(const at::Tensor& t, const char* what) {
  if (t.is_cuda()) return static_cast<uint8_t*>(t.data_ptr());
  TORCH_CHECK(t.device().is_cpu(), "kvtq: ", what, " must be a CUDA tensor or pinned CPU memory");
  void* host = t.data_ptr();
  cudaPointerAttributes attr;
  cudaError_t e = cudaPointerGetAttributes(&attr, host);
  if (e == cudaSuccess && attr.type == cudaMemoryTypeHost && attr.devicePointer != nullptr)
    return static_cast<uint8_t*>(attr.devicePointer);
  (void)cudaGetLastError();
  void* dev = nullptr;
  e = cudaHostGetDevicePointer(&dev, host, 0);
  if (e == cudaSuccess && dev != nullptr) return static_cast<uint8_t*>(dev);
  (void)cudaGetLastError();
  TORCH_CHECK(false, "kvtq: ", what,
              " is CPU memory that the GPU cannot map: it must be pinned (cudaHostAlloc / cudaHostRegister, "
              "e.g. tensor.pin_memory())");
  return nullptr;
}

void check_index(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == at::kLong && t.is_contiguous(), "kvtq: ", what,
              " must be a contiguous CUDA int64 tensor");
}

// ---- encode ---------------------------------------------------------------------------------------

kvtq::EncodeArgs encode_args(const at::Tensor& chunks, const at::Tensor& unit_chunk, const at::Tensor& ptrs,
                             const at::Tensor& token_index, const at::Tensor& header, const at::Tensor& out,
                             int64_t num_layers, int64_t page_size, int64_t units_per_page,
                             const std::vector<int64_t>& row_stride, const std::vector<int64_t>& head_stride) {
  check_index(token_index, "token_index");
  TORCH_CHECK(chunks.is_cuda() && chunks.scalar_type() == at::kInt && chunks.is_contiguous() &&
                  chunks.size(-1) == kvtq::kChunkFields,
              "kvtq: bad chunk table");
  TORCH_CHECK(unit_chunk.is_cuda() && unit_chunk.scalar_type() == at::kInt && unit_chunk.numel() == units_per_page,
              "kvtq: bad unit table");
  TORCH_CHECK(ptrs.is_cuda() && ptrs.scalar_type() == at::kLong && ptrs.is_contiguous(), "kvtq: bad pointer table");
  TORCH_CHECK(header.is_cuda() && header.numel() == 128, "kvtq: bad header");
  TORCH_CHECK(out.is_cuda() && out.scalar_type() == at::kByte && out.dim() == 2 && out.stride(1) == 1,
              "kvtq: out must be a CUDA uint8 [n_pages, page_bytes] tensor");
  TORCH_CHECK(token_index.device() == out.device() && ptrs.device() == out.device(),
              "kvtq: token_index, the device buffers and out must be on one GPU");
  TORCH_CHECK(token_index.numel() % page_size == 0, "kvtq: token_index must cover whole pages");
  TORCH_CHECK(aligned16(out.data_ptr()) && out.stride(0) % 16 == 0, "kvtq: out must be 16-byte aligned");
  TORCH_CHECK(row_stride.size() == 2 && head_stride.size() == 2, "kvtq: strides");
  kvtq::EncodeArgs a{};
  a.chunks = reinterpret_cast<const kvtq::ChunkDesc*>(chunks.data_ptr<int32_t>());
  a.unit_chunk = unit_chunk.data_ptr<int32_t>();
  a.ptrs = reinterpret_cast<const uint64_t*>(ptrs.data_ptr<int64_t>());
  a.token_index = token_index.data_ptr<int64_t>();
  a.header = header.data_ptr<uint8_t>();
  a.out = out.data_ptr<uint8_t>();
  a.out_stride = out.stride(0);
  for (int i = 0; i < 2; ++i) { a.row_stride[i] = row_stride[i]; a.head_stride[i] = head_stride[i]; }
  a.num_layers = (int32_t)num_layers;
  a.page_size = (int32_t)page_size;
  a.units_per_page = (int32_t)units_per_page;
  a.n_pages = (int32_t)(token_index.numel() / page_size);
  a.page_base = 0;
  return a;
}

void encode(const at::Tensor& chunks, const at::Tensor& unit_chunk, const at::Tensor& ptrs, const at::Tensor& token_index,
            const at::Tensor& header, const at::Tensor& out, int64_t num_layers, int64_t page_size, int64_t units_per_page,
            std::vector<int64_t> row_stride, std::vector<int64_t> head_stride, int64_t dtype) {
  kvtq::EncodeArgs a = encode_args(chunks, unit_chunk, ptrs, token_index, header, out, num_layers, page_size,
                                   units_per_page, row_stride, head_stride);
  TORCH_CHECK(out.size(0) == a.n_pages, "kvtq: out has ", out.size(0), " pages, token_index ", a.n_pages);
  if (a.n_pages == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  KVTQ_CUDA_OK(kvtq::launch_encode(a, (int)dtype, c10::cuda::getCurrentCUDAStream().stream()));
}

// staging[0:count] -> host_pages[ids[j]], one 2-D cudaMemcpyAsync per run of consecutive host page ids.
void copy_runs(const at::Tensor& staging, int64_t count, const at::Tensor& host_pages, const int64_t* ids,
               cudaStream_t stream) {
  const int64_t num = host_pages.size(0), pb = staging.size(1);
  const size_t dpitch = (size_t)host_pages.stride(0), spitch = (size_t)staging.stride(0);
  uint8_t* hbase = host_pages.data_ptr<uint8_t>();
  const uint8_t* sbase = staging.data_ptr<uint8_t>();
  for (int64_t j = 0; j < count;) {
    TORCH_CHECK(ids[j] >= 0 && ids[j] < num, "kvtq: host page id ", ids[j], " out of range [0, ", num, ")");
    int64_t run = 1;
    while (j + run < count && ids[j + run] == ids[j] + run) ++run;
    TORCH_CHECK(ids[j] + run <= num, "kvtq: host page id out of range");
    KVTQ_CUDA_OK(cudaMemcpy2DAsync(hbase + ids[j] * dpitch, dpitch, sbase + j * spitch, spitch, (size_t)pb, (size_t)run,
                                   cudaMemcpyDeviceToHost, stream));
    j += run;
  }
}

void check_copy_args(const at::Tensor& staging, const at::Tensor& host_pages, const at::Tensor& host_ids) {
  TORCH_CHECK(staging.is_cuda() && staging.scalar_type() == at::kByte && staging.dim() == 2 && staging.stride(1) == 1,
              "kvtq: staging must be a CUDA uint8 [pages, page_bytes] tensor");
  TORCH_CHECK(host_pages.device().is_cpu() && host_pages.scalar_type() == at::kByte && host_pages.dim() == 2 &&
                  host_pages.stride(1) == 1 && host_pages.size(1) == staging.size(1),
              "kvtq: host_pages must be a CPU uint8 [num_pages, page_bytes] tensor");
  TORCH_CHECK(host_ids.device().is_cpu() && host_ids.scalar_type() == at::kLong && host_ids.is_contiguous(),
              "kvtq: host page ids must be a contiguous CPU int64 tensor");
}

// A side stream (per device) for the backup DMA, so that the quantize kernel of one staging half
// overlaps the copies of the other; two event pairs order the halves.
struct BackupSide {
  cudaStream_t stream = nullptr;
  cudaEvent_t encoded[2] = {nullptr, nullptr};
  cudaEvent_t copied[2] = {nullptr, nullptr};
};

std::mutex g_side_mu;
std::unordered_map<int, BackupSide> g_side;

BackupSide& backup_side(int device) {  // call with g_side_mu held
  BackupSide& x = g_side[device];
  if (x.stream == nullptr) {
    KVTQ_CUDA_OK(cudaStreamCreateWithFlags(&x.stream, cudaStreamNonBlocking));
    for (int i = 0; i < 2; ++i) {
      KVTQ_CUDA_OK(cudaEventCreateWithFlags(&x.encoded[i], cudaEventDisableTiming));
      KVTQ_CUDA_OK(cudaEventCreateWithFlags(&x.copied[i], cudaEventDisableTiming));
    }
  }
  return x;
}

// Backup: quantize into `staging` and DMA the pages to their host pages. With two or more staging
// pages, the staging area is used as two halves: the kernel fills one half on the current stream while
// a side stream copies the other; the current stream waits for every copy before it returns, so work
// queued on it afterwards (and events recorded on it) sees the host pages written. Host ids are read on
// the CPU now.
void backup(const at::Tensor& chunks, const at::Tensor& unit_chunk, const at::Tensor& ptrs, const at::Tensor& token_index,
            const at::Tensor& header, const at::Tensor& staging, const at::Tensor& host_pages, const at::Tensor& host_ids,
            int64_t num_layers, int64_t page_size, int64_t units_per_page, std::vector<int64_t> row_stride,
            std::vector<int64_t> head_stride, int64_t dtype) {
  kvtq::EncodeArgs a = encode_args(chunks, unit_chunk, ptrs, token_index, header, staging, num_layers, page_size,
                                   units_per_page, row_stride, head_stride);
  check_copy_args(staging, host_pages, host_ids);
  const int64_t n = a.n_pages;
  TORCH_CHECK(host_ids.numel() == n, "kvtq: ", host_ids.numel(), " host page ids for ", n, " pages");
  TORCH_CHECK(staging.size(0) > 0, "kvtq: empty staging");
  if (n == 0) return;
  for (int64_t j = 0; j < n; ++j)  // validate before anything is enqueued
    TORCH_CHECK(host_ids.data_ptr<int64_t>()[j] >= 0 && host_ids.data_ptr<int64_t>()[j] < host_pages.size(0),
                "kvtq: host page id ", host_ids.data_ptr<int64_t>()[j], " out of range [0, ", host_pages.size(0), ")");
  const c10::cuda::CUDAGuard guard(staging.device());
  const cudaStream_t main = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t cap = staging.size(0);
  const int64_t* ids = host_ids.data_ptr<int64_t>();
  const int64_t* tok = token_index.data_ptr<int64_t>();
  const int64_t sstride = staging.stride(0);
  if (cap < 2 || n == 1) {  // one staging page: encode and copy in turn on the current stream
    for (int64_t start = 0; start < n; start += cap) {
      const int64_t m = std::min(cap, n - start);
      kvtq::EncodeArgs b = a;
      b.token_index = tok + start * page_size;
      b.n_pages = (int32_t)m;
      KVTQ_CUDA_OK(kvtq::launch_encode(b, (int)dtype, main));
      copy_runs(staging, m, host_pages, ids + start, main);
    }
    return;
  }
  const std::lock_guard<std::mutex> lock(g_side_mu);
  BackupSide& side = backup_side(staging.device().index());
  const int64_t half = std::min(cap / 2, (n + 1) / 2);
  for (int h = 0; h < 2; ++h) KVTQ_CUDA_OK(cudaStreamWaitEvent(main, side.copied[h], 0));  // earlier calls' copies
  int used = 0;
  for (int64_t start = 0, k = 0; start < n; start += half, ++k) {
    const int h = (int)(k & 1);
    const int64_t m = std::min(half, n - start);
    if (k >= 2) KVTQ_CUDA_OK(cudaStreamWaitEvent(main, side.copied[h], 0));  // this half's last copy is done
    kvtq::EncodeArgs b = a;
    b.token_index = tok + start * page_size;
    b.n_pages = (int32_t)m;
    b.out = a.out + (int64_t)h * half * sstride;
    KVTQ_CUDA_OK(kvtq::launch_encode(b, (int)dtype, main));
    KVTQ_CUDA_OK(cudaEventRecord(side.encoded[h], main));
    KVTQ_CUDA_OK(cudaStreamWaitEvent(side.stream, side.encoded[h], 0));
    copy_runs(staging.narrow(0, h * half, m), m, host_pages, ids + start, side.stream);
    KVTQ_CUDA_OK(cudaEventRecord(side.copied[h], side.stream));
    used |= 1 << h;
  }
  for (int h = 0; h < 2; ++h)
    if (used & (1 << h)) KVTQ_CUDA_OK(cudaStreamWaitEvent(main, side.copied[h], 0));
}

// ---- decode ---------------------------------------------------------------------------------------

void decode(const at::Tensor& desc, const at::Tensor& pages, const at::Tensor& page_ids, const at::Tensor& dst0, const at::Tensor& dst1,
            const at::Tensor& token_index, int64_t page_size, int64_t smem_codes, int64_t smem_meta, int64_t blocks) {
  TORCH_CHECK(desc.device().is_cpu() && desc.scalar_type() == at::kLong && desc.is_contiguous() && desc.dim() == 2 &&
                  desc.size(1) == kvtq::kDecodeFields && desc.size(0) >= 1 && desc.size(0) <= 2,
              "kvtq: bad decode descriptor");
  check_index(page_ids, "page_ids");
  check_index(token_index, "token_index");
  TORCH_CHECK(pages.scalar_type() == at::kByte && pages.dim() == 2 && pages.stride(1) == 1,
              "kvtq: pages must be a uint8 [num_pages, page_bytes] tensor");
  const int64_t n_pages = page_ids.numel();
  TORCH_CHECK(token_index.numel() == n_pages * page_size, "kvtq: token_index must hold page_size rows per page");
  TORCH_CHECK(dst0.is_cuda() && dst1.is_cuda() && dst0.dim() == 3 && dst1.dim() == 3 && dst0.stride(2) == 1 &&
                  dst1.stride(2) == 1 && dst0.scalar_type() == dst1.scalar_type(),
              "kvtq: device buffers must be CUDA [rows, heads, dim] tensors with a contiguous last dim");
  TORCH_CHECK(page_ids.device() == dst0.device() && token_index.device() == dst0.device() &&
                  dst1.device() == dst0.device(),
              "kvtq: page_ids, token_index and the device buffers must be on one GPU");
  if (n_pages == 0) return;
  const int dt = dtype_code(dst0);
  const c10::cuda::CUDAGuard guard(dst0.device());
  kvtq::DecodeArgs a{};
  const int64_t* d = desc.data_ptr<int64_t>();
  a.nstreams = (int32_t)desc.size(0);
  int64_t upp = 0;
  const at::Tensor* dsts[2] = {&dst0, &dst1};
  for (int s = 0; s < a.nstreams; ++s) {
    std::memcpy(&a.st[s], d + s * kvtq::kDecodeFields, sizeof(kvtq::DecodeStream));
    const kvtq::DecodeStream& S = a.st[s];
    const at::Tensor& t = *dsts[S.buffer];
    TORCH_CHECK(t.size(1) == S.heads && t.size(2) >= S.col_off + S.dim, "kvtq: device buffer ", S.buffer, " has shape ",
                t.sizes(), ", the layout wants ", S.heads, " heads x ", S.col_off + S.dim, " columns");
    upp += S.units;
  }
  for (int b = 0; b < 2; ++b) {
    const at::Tensor& t = *dsts[b];
    TORCH_CHECK(t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 && aligned16(t.data_ptr()),
                "kvtq: device rows must be 16-byte aligned");
    a.dst[b] = t.data_ptr();
    a.row_stride[b] = t.stride(0);
    a.head_stride[b] = t.stride(1);
  }
  a.pages = kernel_ptr(pages, "pages");
  TORCH_CHECK(aligned16(a.pages) && pages.stride(0) % 16 == 0, "kvtq: pages must be 16-byte aligned");
  a.page_stride = pages.stride(0);
  a.page_ids = page_ids.data_ptr<int64_t>();
  a.token_index = token_index.data_ptr<int64_t>();
  a.page_size = (int32_t)page_size;
  a.n_pages = (int32_t)n_pages;
  a.units_per_page = (int32_t)upp;
  a.smem_codes = (int32_t)smem_codes;
  a.smem_meta = (int32_t)smem_meta;
  KVTQ_CUDA_OK(kvtq::launch_decode(a, dt, (int)blocks, c10::cuda::getCurrentCUDAStream().stream()));
}

// ---- backup: staged pages -> pinned host pages ------------------------------------------------------

// Copies staging[0:count] to host_pages[host_ids[first + j]] with one 2-D cudaMemcpyAsync per run of
// consecutive host page ids, on the current stream. host_ids: CPU int64 (read on the host now).
void copy_pages_d2h(const at::Tensor& staging, int64_t count, const at::Tensor& host_pages, const at::Tensor& host_ids,
                    int64_t first) {
  check_copy_args(staging, host_pages, host_ids);
  TORCH_CHECK(count >= 0 && count <= staging.size(0) && first >= 0 && first + count <= host_ids.numel(),
              "kvtq: copy range out of bounds");
  if (count == 0) return;
  const c10::cuda::CUDAGuard guard(staging.device());
  copy_runs(staging, count, host_pages, host_ids.data_ptr<int64_t>() + first, c10::cuda::getCurrentCUDAStream().stream());
}

// ---- bf16 baselines (benchmark only) ----------------------------------------------------------------

void bf16_load_layer(const at::Tensor& host_k, const at::Tensor& host_v, const at::Tensor& dev_k, const at::Tensor& dev_v,
                     const at::Tensor& host_idx, const at::Tensor& dev_idx, int64_t layer, int64_t blocks, int64_t threads) {
  // host_k/v: page_first [slots, L, H, D]; dev_k/v: [rows, H, D]
  check_index(host_idx, "host_idx");
  check_index(dev_idx, "dev_idx");
  TORCH_CHECK(host_k.dim() == 4 && host_k.is_contiguous() && dev_k.dim() == 3 && dev_k.is_contiguous(), "kvtq: bf16 shapes");
  const c10::cuda::CUDAGuard guard(dev_k.device());
  const int64_t es = host_k.element_size();
  const int row_bytes = (int)(host_k.size(2) * host_k.size(3) * es);
  KVTQ_CUDA_OK(kvtq::launch_bf16_load_layer(kernel_ptr(host_k, "host_k"), kernel_ptr(host_v, "host_v"),
                                            static_cast<uint8_t*>(dev_k.data_ptr()), static_cast<uint8_t*>(dev_v.data_ptr()),
                                            host_idx.data_ptr<int64_t>(), dev_idx.data_ptr<int64_t>(), host_idx.numel(),
                                            host_k.stride(0) * es, layer * row_bytes, dev_k.stride(0) * es, row_bytes,
                                            (int)blocks, (int)threads, c10::cuda::getCurrentCUDAStream().stream()));
}

void bf16_backup_all(const at::Tensor& k_ptrs, const at::Tensor& v_ptrs, const at::Tensor& host_k, const at::Tensor& host_v,
                     const at::Tensor& host_idx, const at::Tensor& dev_idx, int64_t dev_row_stride_bytes, int64_t blocks,
                     int64_t threads) {
  check_index(host_idx, "host_idx");
  check_index(dev_idx, "dev_idx");
  TORCH_CHECK(host_k.dim() == 4 && host_k.is_contiguous(), "kvtq: bf16 shapes");
  const c10::cuda::CUDAGuard guard(k_ptrs.device());
  const int64_t es = host_k.element_size();
  const int row_bytes = (int)(host_k.size(2) * host_k.size(3) * es);
  KVTQ_CUDA_OK(kvtq::launch_bf16_backup_all(reinterpret_cast<const uint64_t*>(k_ptrs.data_ptr<int64_t>()),
                                            reinterpret_cast<const uint64_t*>(v_ptrs.data_ptr<int64_t>()),
                                            kernel_ptr(host_k, "host_k"), kernel_ptr(host_v, "host_v"),
                                            host_idx.data_ptr<int64_t>(), dev_idx.data_ptr<int64_t>(), host_idx.numel(),
                                            (int)host_k.size(1), host_k.stride(0) * es, dev_row_stride_bytes, row_bytes,
                                            (int)blocks, (int)threads, c10::cuda::getCurrentCUDAStream().stream()));
}

int64_t sm_count() {
  int dev = 0, n = 0;
  KVTQ_CUDA_OK(cudaGetDevice(&dev));
  KVTQ_CUDA_OK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  return n;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kvtuner_hicache quantized page codec (CUDA)";
  m.def("encode", &encode, "quantize device rows into whole pages (one launch, all layers)");
  m.def("decode", &decode, "dequantize one layer of pages into device rows (zero-copy from pinned memory)");
  m.def("backup", &backup, "quantize pages into GPU staging and DMA them to pinned host pages");
  m.def("copy_pages_d2h", &copy_pages_d2h, "staged pages -> pinned host pages, one DMA per run of pages");
  m.def("bf16_load_layer", &bf16_load_layer, "benchmark baseline: bf16 zero-copy per-layer load");
  m.def("bf16_backup_all", &bf16_backup_all, "benchmark baseline: bf16 zero-copy all-layer backup");
  m.def("sm_count", &sm_count, "multiprocessors of the current device");
  m.attr("chunk_fields") = kvtq::kChunkFields;
  m.attr("decode_fields") = kvtq::kDecodeFields;
  m.attr("threads") = kvtq::kThreads;
  m.attr("enc_items_per_unit") = kvtq::kEncItemsPerUnit;
  m.attr("enc_max_tokens_per_thread") = kvtq::kEncMaxTokensPerThread;
  m.attr("dec_max_code_bytes") = kvtq::kDecMaxCodeBytes;
  m.attr("dec_max_meta") = kvtq::kDecMaxMeta;
}
