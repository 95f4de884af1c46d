// KVTQ_CHECK(cond, parts...): a TORCH_CHECK that formats its message here and hands c10 one C string.
//
// Why not TORCH_CHECK itself: on the GPU image (torch 2.11.0+cu130, g++ 13.3, run 9) a TORCH_CHECK whose
// message had non-literal parts (c10 takes those as a std::string) segfaulted instead of raising, in the
// wheel and in a plain cpp_extension build alike; one C string, and TORCH_CHECK_INDEX, raised as they should
// (test/gpu/test_native_crc.py::test_skip_range_and_plain_crc). Bad input must raise, never crash a server.
#pragma once

#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <string>

#define KVTQ_CHECK(cond, ...)                                         \
  do {                                                                \
    if (C10_UNLIKELY(!(cond))) {                                      \
      const std::string kvtq_check_msg_ = ::c10::str(__VA_ARGS__);    \
      TORCH_CHECK(false, kvtq_check_msg_.c_str());                    \
    }                                                                 \
  } while (0)
