// KVTQ_CHECK(cond, parts...): raise like TORCH_CHECK, with the message built here in a fixed char buffer
// (snprintf: no iostream, no std::string) and handed to c10 as one C string.
//
// Why not TORCH_CHECK itself: on the GPU image (torch 2.11.0+cu130, g++ 13.3; run 9) a TORCH_CHECK whose
// message had non-literal parts segfaulted instead of raising, in the wheel and in a plain cpp_extension
// build alike, and so did the same check with the message formatted by c10::str first; TORCH_CHECK with one
// C string raised as it should (test/gpu/test_native_crc.py::test_skip_range_and_plain_crc). c10::str
// formats through std::ostringstream, so the message is formatted without it. Bad input must raise, never
// crash a server. Parts: C strings, std::string, integers, floating point, bool, at::ScalarType, c10::Device,
// c10::IntArrayRef; a message longer than the buffer is cut.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <type_traits>

namespace kvtq_check {

struct Message {
  char buf[512];
  size_t n = 0;
  Message() { buf[0] = '\0'; }
  template <class... A>
  void printf(const char* fmt, A... a) {
    if (n + 1 >= sizeof(buf)) return;
    const int w = std::snprintf(buf + n, sizeof(buf) - n, fmt, a...);
    if (w > 0) n = std::min(sizeof(buf) - 1, n + static_cast<size_t>(w));
  }
  void put(const char* s) { printf("%s", s ? s : "(null)"); }
  void put(const std::string& s) { put(s.c_str()); }
  void put(bool v) { put(v ? "true" : "false"); }
  template <class T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool>, int> = 0>
  void put(T v) {
    if constexpr (std::is_signed_v<T>) printf("%lld", static_cast<long long>(v));
    else printf("%llu", static_cast<unsigned long long>(v));
  }
  template <class T, std::enable_if_t<std::is_floating_point_v<T>, int> = 0>
  void put(T v) { printf("%g", static_cast<double>(v)); }
  void put(c10::ScalarType t) { put(c10::toString(t)); }
  void put(const c10::Device& d) {
    put(d.is_cuda() ? "cuda" : d.is_cpu() ? "cpu" : "device");
    if (d.has_index()) printf(":%d", static_cast<int>(d.index()));
  }
  void put(c10::IntArrayRef a) {
    put("[");
    for (size_t i = 0; i < a.size(); ++i) printf(i ? ", %lld" : "%lld", static_cast<long long>(a[i]));
    put("]");
  }
  template <class... A>
  const char* add(const A&... parts) {
    (put(parts), ...);
    return buf;
  }
};

}  // namespace kvtq_check

#define KVTQ_CHECK(cond, ...)                                         \
  do {                                                                \
    if (C10_UNLIKELY(!(cond))) {                                      \
      ::kvtq_check::Message kvtq_check_msg_;                          \
      TORCH_CHECK(false, kvtq_check_msg_.add(__VA_ARGS__));           \
    }                                                                 \
  } while (0)
