// bf16 baselines of benchmark/bench_transfer.py (not part of the kernel wheel): zero-copy copy kernels
// with SGLang's access pattern (one warp per token row, page_first host layout [slots, L, H, D] per
// K/V). JIT-built by benchmark/bf16_baseline.py into torch.ops.kvtq_bench.*.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

namespace {

constexpr int kRowChunks = 4;  // up to 4 x 512 B per row per warp in flight

__device__ __forceinline__ void warp_copy_row(uint8_t* dst, const uint8_t* src, int row_bytes, int lane) {
  for (int base = 0; base < row_bytes; base += 512 * kRowChunks) {
    uint4 r[kRowChunks];
#pragma unroll
    for (int j = 0; j < kRowChunks; ++j) {
      const int o = base + j * 512 + lane * 16;
      if (o < row_bytes) r[j] = *reinterpret_cast<const uint4*>(src + o);
    }
#pragma unroll
    for (int j = 0; j < kRowChunks; ++j) {
      const int o = base + j * 512 + lane * 16;
      if (o < row_bytes) *reinterpret_cast<uint4*>(dst + o) = r[j];
    }
  }
}

__global__ void bf16_load_layer_kernel(const uint8_t* hk, const uint8_t* hv, uint8_t* dk, uint8_t* dv, const int64_t* hidx,
                                       const int64_t* didx, int64_t n, int64_t host_tok_stride, int64_t host_layer_off,
                                       int64_t dev_row_stride, int row_bytes) {
  const int lane = threadIdx.x & 31;
  const int64_t nwarps = (int64_t)gridDim.x * (blockDim.x >> 5);
  for (int64_t r = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); r < n; r += nwarps) {
    const int64_t hoff = hidx[r] * host_tok_stride + host_layer_off;
    const int64_t doff = didx[r] * dev_row_stride;
    warp_copy_row(dk + doff, hk + hoff, row_bytes, lane);
    warp_copy_row(dv + doff, hv + hoff, row_bytes, lane);
  }
}

__global__ void bf16_backup_all_kernel(const uint64_t* kp, const uint64_t* vp, uint8_t* hk, uint8_t* hv, const int64_t* hidx,
                                       const int64_t* didx, int64_t n, int L, int64_t host_tok_stride, int64_t dev_row_stride,
                                       int row_bytes) {
  const int lane = threadIdx.x & 31;
  const int64_t nwarps = (int64_t)gridDim.x * (blockDim.x >> 5);
  const int64_t rows = n * L;
  for (int64_t r = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); r < rows; r += nwarps) {
    const int64_t i = r / L;
    const int l = (int)(r - i * L);
    const int64_t hoff = hidx[i] * host_tok_stride + (int64_t)l * row_bytes;
    const int64_t doff = didx[i] * dev_row_stride;
    warp_copy_row(hk + hoff, reinterpret_cast<const uint8_t*>(kp[l]) + doff, row_bytes, lane);
    warp_copy_row(hv + hoff, reinterpret_cast<const uint8_t*>(vp[l]) + doff, row_bytes, lane);
  }
}


void check_index(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == at::kLong && t.is_contiguous(), what, " must be a contiguous CUDA int64 tensor");
}

uint8_t* mapped(const at::Tensor& t) {
  if (t.is_cuda()) return static_cast<uint8_t*>(t.data_ptr());
  void* dev = nullptr;
  TORCH_CHECK(cudaHostGetDevicePointer(&dev, t.data_ptr(), 0) == cudaSuccess, "host buffer must be pinned");
  return static_cast<uint8_t*>(dev);
}

void bf16_load_layer(const at::Tensor& host_k, const at::Tensor& host_v, const at::Tensor& dev_k, const at::Tensor& dev_v,
                     const at::Tensor& host_idx, const at::Tensor& dev_idx, int64_t layer, int64_t blocks, int64_t threads) {
  check_index(host_idx, "host_idx");
  check_index(dev_idx, "dev_idx");
  TORCH_CHECK(host_k.dim() == 4 && host_k.is_contiguous() && dev_k.dim() == 3 && dev_k.is_contiguous(), "bf16 shapes");
  const c10::cuda::CUDAGuard guard(dev_k.device());
  const int64_t es = host_k.element_size();
  const int row_bytes = (int)(host_k.size(2) * host_k.size(3) * es);
  if (host_idx.numel() == 0) return;
  bf16_load_layer_kernel<<<(int)blocks, (int)threads, 0, c10::cuda::getCurrentCUDAStream().stream()>>>(
      mapped(host_k), mapped(host_v), static_cast<uint8_t*>(dev_k.data_ptr()), static_cast<uint8_t*>(dev_v.data_ptr()),
      host_idx.data_ptr<int64_t>(), dev_idx.data_ptr<int64_t>(), host_idx.numel(), host_k.stride(0) * es, layer * row_bytes,
      dev_k.stride(0) * es, row_bytes);
  TORCH_CHECK(cudaGetLastError() == cudaSuccess, "bf16_load_layer launch failed");
}

void bf16_backup_all(const at::Tensor& k_ptrs, const at::Tensor& v_ptrs, const at::Tensor& host_k, const at::Tensor& host_v,
                     const at::Tensor& host_idx, const at::Tensor& dev_idx, int64_t dev_row_stride_bytes, int64_t blocks,
                     int64_t threads) {
  check_index(host_idx, "host_idx");
  check_index(dev_idx, "dev_idx");
  TORCH_CHECK(host_k.dim() == 4 && host_k.is_contiguous(), "bf16 shapes");
  const c10::cuda::CUDAGuard guard(k_ptrs.device());
  const int64_t es = host_k.element_size();
  const int row_bytes = (int)(host_k.size(2) * host_k.size(3) * es);
  if (host_idx.numel() == 0) return;
  bf16_backup_all_kernel<<<(int)blocks, (int)threads, 0, c10::cuda::getCurrentCUDAStream().stream()>>>(
      reinterpret_cast<const uint64_t*>(k_ptrs.data_ptr()), reinterpret_cast<const uint64_t*>(v_ptrs.data_ptr()),
      mapped(host_k), mapped(host_v), host_idx.data_ptr<int64_t>(), dev_idx.data_ptr<int64_t>(), host_idx.numel(),
      (int)host_k.size(1), host_k.stride(0) * es, dev_row_stride_bytes, row_bytes);
  TORCH_CHECK(cudaGetLastError() == cudaSuccess, "bf16_backup_all launch failed");
}

}  // namespace

TORCH_LIBRARY(kvtq_bench, m) {
  m.def("bf16_load_layer(Tensor host_k, Tensor host_v, Tensor(a!) dev_k, Tensor(b!) dev_v, Tensor host_idx, "
        "Tensor dev_idx, int layer, int blocks, int threads) -> ()");
  m.def("bf16_backup_all(Tensor k_ptrs, Tensor v_ptrs, Tensor(a!) host_k, Tensor(b!) host_v, Tensor host_idx, "
        "Tensor dev_idx, int dev_row_stride_bytes, int blocks, int threads) -> ()");
}

TORCH_LIBRARY_IMPL(kvtq_bench, CUDA, m) {
  m.impl("bf16_load_layer", &bf16_load_layer);
  m.impl("bf16_backup_all", &bf16_backup_all);
}
