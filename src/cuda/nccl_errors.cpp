// The NCCL backend (ringflow/cuda/nccl.hpp), part 1 of 4: checked NCCL
// calls (the error text, throwing and logging) and ringflow's types and ops
// in NCCL's terms.
#include "nccl_internal.hpp"

#if RINGFLOW_HAS_NCCL

namespace ringflow::cuda {

// --- Checked calls -----------------------------------------------------------

namespace detail {

const char* nccl_result_name(ncclResult_t code) noexcept {
  switch (code) {
    case ncclSuccess: return "ncclSuccess";
    case ncclUnhandledCudaError: return "ncclUnhandledCudaError";
    case ncclSystemError: return "ncclSystemError";
    case ncclInternalError: return "ncclInternalError";
    case ncclInvalidArgument: return "ncclInvalidArgument";
    case ncclInvalidUsage: return "ncclInvalidUsage";
    case ncclRemoteError: return "ncclRemoteError";
    case ncclInProgress: return "ncclInProgress";
    default: return "ncclResult(unknown)";
  }
}

namespace {
std::string nccl_text(ncclResult_t code) {
  std::string text = ncclGetErrorString(code);
  // The last error is per thread (the argument is unused by NCCL): the
  // detailed reason behind the generic string, when NCCL recorded one.
  if (const char* last = ncclGetLastError(nullptr); last != nullptr && *last != '\0') {
    text += ": ";
    text += last;
  }
  return text;
}
}  // namespace

void throw_nccl_error(ncclResult_t code, const char* call, const char* file, int line) {
  throw nccl_error(cuda::detail::describe_failure(nccl_result_name(code), nccl_text(code).c_str(),
                                                  call, file, line),
                   code);
}

void log_nccl_error(ncclResult_t code, const char* call, const char* file, int line) noexcept {
  try {
    ringflow::log::write(ringflow::log::level::error,
                         cuda::detail::describe_failure(nccl_result_name(code),
                                                        nccl_text(code).c_str(), call, file, line));
  } catch (...) {}
}

ncclDataType_t nccl_type(dtype t) {
  switch (t) {
    case dtype::f32: return ncclFloat32;
    case dtype::f64: return ncclFloat64;
    case dtype::i8: return ncclInt8;
    case dtype::u8: return ncclUint8;
    case dtype::i32: return ncclInt32;
    case dtype::i64: return ncclInt64;
    case dtype::f16: return ncclFloat16;
    case dtype::bf16: return ncclBfloat16;
  }
  throw usage_error(fmt::format("nccl: no NCCL type for dtype {}", static_cast<int>(t)));
}

ncclRedOp_t nccl_op(op_kind k) {
  switch (k) {
    case op_kind::sum: return ncclSum;
    case op_kind::prod: return ncclProd;
    case op_kind::min: return ncclMin;
    case op_kind::max: return ncclMax;
    case op_kind::avg: return ncclAvg;
  }
  throw usage_error(fmt::format("nccl: no NCCL op for op {}", static_cast<int>(k)));
}

}  // namespace detail

}  // namespace ringflow::cuda

#endif  // RINGFLOW_HAS_NCCL
