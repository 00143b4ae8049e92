// Element types ringflow moves and reduces, and their run-time tags.
#pragma once

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <string_view>
#include <type_traits>

#include "ringflow/core/half.hpp"

namespace ringflow {

/// Run-time tag of an element type; travels in fingerprints and bench output.
enum class dtype : std::uint8_t { f32, f64, i8, u8, i32, i64, f16, bf16 };

template <class T>
struct dtype_traits;  // undefined for unsupported types: a compile error names T

#define RINGFLOW_DTYPE_TRAIT(T, TAG, NAME, FLOAT)  \
  template <>                                      \
  struct dtype_traits<T> {                         \
    static constexpr dtype tag = dtype::TAG;       \
    static constexpr std::string_view name = NAME; \
    static constexpr bool is_floating = FLOAT;     \
  }

RINGFLOW_DTYPE_TRAIT(float, f32, "float", true);
RINGFLOW_DTYPE_TRAIT(double, f64, "double", true);
RINGFLOW_DTYPE_TRAIT(std::int8_t, i8, "int8", false);
RINGFLOW_DTYPE_TRAIT(std::uint8_t, u8, "uint8", false);
RINGFLOW_DTYPE_TRAIT(std::int32_t, i32, "int32", false);
RINGFLOW_DTYPE_TRAIT(std::int64_t, i64, "int64", false);
RINGFLOW_DTYPE_TRAIT(half, f16, "half", true);
RINGFLOW_DTYPE_TRAIT(bfloat16, bf16, "bfloat16", true);
#undef RINGFLOW_DTYPE_TRAIT

/// A type ringflow can reduce: one of the eight above.
template <class T>
concept element = requires {
  dtype_traits<std::remove_cv_t<T>>::tag;
};

template <element T>
inline constexpr dtype dtype_of = dtype_traits<std::remove_cv_t<T>>::tag;

constexpr std::size_t dtype_size(dtype t) {
  switch (t) {
    case dtype::f32: return 4;
    case dtype::f64: return 8;
    case dtype::i8: return 1;
    case dtype::u8: return 1;
    case dtype::i32: return 4;
    case dtype::i64: return 8;
    case dtype::f16: return 2;
    case dtype::bf16: return 2;
  }
  return 0;
}

constexpr std::string_view dtype_name(dtype t) {
  switch (t) {
    case dtype::f32: return "float";
    case dtype::f64: return "double";
    case dtype::i8: return "int8";
    case dtype::u8: return "uint8";
    case dtype::i32: return "int32";
    case dtype::i64: return "int64";
    case dtype::f16: return "half";
    case dtype::bf16: return "bfloat16";
  }
  return "unknown";
}

}  // namespace ringflow
