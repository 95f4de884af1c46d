// CRC32C of a batch of host pages in one operator call (`torch.ops.kvtq.page_crcs`): the L3 integrity
// check of page format 2 (python/kvtuner_hicache/page_format.py, `page_crcs`).
//
// Why native: the Python path calls the crc32c package once per page, and every call hands the GIL back
// and must win it again. In a server whose scheduler thread is busy that wait dominates (400 MB of pages:
// 16 ms on an idle CPU, 320 ms beside one busy Python thread). A torch operator runs with the GIL
// released, so the whole batch costs one release; the pages are split over up to `threads` std::threads (one
// per 8 MB: a small batch does not pay for starting threads), and each
// thread runs three pages at a time (the CRC instruction's latency is three times its issue rate).
//
// Contract: `addrs`/`lens` are CPU int64 tensors of n host addresses and byte lengths that the caller
// keeps alive for the (synchronous) call. The CRC of page i covers bytes [0, skip_begin) and
// [skip_end, lens[i]) continued as one stream (the page's own CRC field is skipped), initial value 0,
// the same value as `crc32c.crc32c`. Returns a CPU int64 tensor of n CRCs.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "kvtq_check.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#if defined(__x86_64__)
#include <nmmintrin.h>
#elif defined(__aarch64__) && defined(__ARM_FEATURE_CRC32)
#include <arm_acle.h>
#endif

namespace {

// Castagnoli polynomial, reflected; the software path (no CRC instruction) and the tail bytes.
uint32_t g_table[256];
bool g_table_ready = [] {
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
    g_table[i] = c;
  }
  return true;
}();

uint32_t crc_sw(uint32_t crc, const uint8_t* p, size_t n) {
  for (size_t i = 0; i < n; ++i) crc = g_table[(crc ^ p[i]) & 0xFFu] ^ (crc >> 8);
  return crc;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) uint32_t crc_hw(uint32_t crc, const uint8_t* p, size_t n) {
  uint64_t c = crc;
  for (; n >= 8; n -= 8, p += 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    c = _mm_crc32_u64(c, w);
  }
  return crc_sw((uint32_t)c, p, n);
}
// Three independent streams per loop: the CRC instruction has a latency of ~3 cycles and a throughput of
// one per cycle, so one stream runs at a third of what the core can do. Each stream is a page of its own
// (no CRC combination needed); the streams advance together over their common length.
__attribute__((target("sse4.2"))) void crc_hw3(uint32_t crc[3], const uint8_t* p[3], size_t n) {
  uint64_t c0 = crc[0], c1 = crc[1], c2 = crc[2];
  const uint8_t *a = p[0], *b = p[1], *d = p[2];
  for (size_t i = 0; i + 8 <= n; i += 8) {
    uint64_t w0, w1, w2;
    std::memcpy(&w0, a + i, 8);
    std::memcpy(&w1, b + i, 8);
    std::memcpy(&w2, d + i, 8);
    c0 = _mm_crc32_u64(c0, w0);
    c1 = _mm_crc32_u64(c1, w1);
    c2 = _mm_crc32_u64(c2, w2);
  }
  crc[0] = (uint32_t)c0, crc[1] = (uint32_t)c1, crc[2] = (uint32_t)c2;
}
bool hw_present() { return __builtin_cpu_supports("sse4.2"); }
#elif defined(__aarch64__) && defined(__ARM_FEATURE_CRC32)
uint32_t crc_hw(uint32_t crc, const uint8_t* p, size_t n) {
  for (; n >= 8; n -= 8, p += 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    crc = __crc32cd(crc, w);
  }
  return crc_sw(crc, p, n);
}
void crc_hw3(uint32_t crc[3], const uint8_t* p[3], size_t n) {
  for (size_t i = 0; i + 8 <= n; i += 8)
    for (int k = 0; k < 3; ++k) {
      uint64_t w;
      std::memcpy(&w, p[k] + i, 8);
      crc[k] = __crc32cd(crc[k], w);
    }
}
bool hw_present() { return true; }
#else
uint32_t crc_hw(uint32_t crc, const uint8_t* p, size_t n) { return crc_sw(crc, p, n); }
void crc_hw3(uint32_t crc[3], const uint8_t* p[3], size_t n) {
  for (int k = 0; k < 3; ++k) crc[k] = crc_sw(crc[k], p[k], n - n % 8);
}
bool hw_present() { return false; }
#endif

const bool g_hw = hw_present();

uint32_t crc_update(uint32_t crc, const uint8_t* p, size_t n) { return g_hw ? crc_hw(crc, p, n) : crc_sw(crc, p, n); }

// Whether page_crcs uses a CRC instruction (the Python side prefers the crc32c package otherwise).
bool crc32c_hardware() { return g_hw; }

at::Tensor page_crcs(const at::Tensor& addrs, const at::Tensor& lens, int64_t skip_begin, int64_t skip_end,
                     int64_t threads) {
  KVTQ_CHECK(addrs.device().is_cpu() && lens.device().is_cpu() && addrs.scalar_type() == at::kLong &&
                  lens.scalar_type() == at::kLong && addrs.is_contiguous() && lens.is_contiguous() &&
                  addrs.numel() == lens.numel(),
              "kvtq: page_crcs takes two contiguous CPU int64 tensors of equal length (addresses, lengths)");
  KVTQ_CHECK(0 <= skip_begin && skip_begin <= skip_end, "kvtq: page_crcs needs 0 <= skip_begin <= skip_end");
  const int64_t n = addrs.numel();
  const int64_t* a = addrs.data_ptr<int64_t>();
  const int64_t* l = lens.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    KVTQ_CHECK(a[i] != 0 && l[i] >= skip_end, "kvtq: page_crcs: page ", i, " is null or shorter than ", skip_end,
                " bytes");
    total += l[i];
  }
  at::Tensor out = at::empty({n}, addrs.options());
  int64_t* o = out.data_ptr<int64_t>();
  auto one = [&](int64_t i) {
    const uint8_t* p = reinterpret_cast<const uint8_t*>(a[i]);
    uint32_t c = crc_update(0xFFFFFFFFu, p, (size_t)skip_begin);
    c = crc_update(c, p + skip_end, (size_t)(l[i] - skip_end));
    o[i] = (int64_t)(~c);
  };
  auto share = [&](int64_t lo, int64_t hi) {
    int64_t i = lo;
    for (; g_hw && i + 3 <= hi; i += 3) {  // three pages at a time over their common length
      uint32_t c[3];
      const uint8_t* body[3];
      size_t len[3];
      for (int k = 0; k < 3; ++k) {
        const uint8_t* p = reinterpret_cast<const uint8_t*>(a[i + k]);
        c[k] = crc_update(0xFFFFFFFFu, p, (size_t)skip_begin);
        body[k] = p + skip_end;
        len[k] = (size_t)(l[i + k] - skip_end);
      }
      const size_t common = std::min({len[0], len[1], len[2]}) / 8 * 8;
      crc_hw3(c, body, common);
      for (int k = 0; k < 3; ++k) o[i + k] = (int64_t)(~crc_update(c[k], body[k] + common, len[k] - common));
    }
    for (; i < hi; ++i) one(i);
  };
  // a thread of its own only for every kMinBytesPerThread: starting one costs tens of microseconds
  constexpr int64_t kMinBytesPerThread = 8 << 20;
  const int64_t t = std::max<int64_t>(1, std::min<int64_t>({threads, n, total / kMinBytesPerThread}));
  const int64_t step = (n + t - 1) / std::max<int64_t>(t, 1);
  std::vector<std::thread> pool;
  for (int64_t lo = step; lo < n; lo += step) pool.emplace_back(share, lo, std::min(n, lo + step));
  share(0, std::min(n, step));
  for (auto& th : pool) th.join();
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvtq, m) {
  m.def("crc32c_hardware() -> bool", &crc32c_hardware);
  m.def("page_crcs(Tensor addrs, Tensor lens, int skip_begin, int skip_end, int threads) -> Tensor", &page_crcs);
}
