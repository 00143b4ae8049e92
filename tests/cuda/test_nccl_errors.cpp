// RINGFLOW_CHECK_NCCL's errors (one process, no mpirun): a deliberately
// failing NCCL call must throw nccl_error naming the call, the rank and
// NCCL's error; and the dtype/op mapping the NCCL backend uses.
#include "support/catch.hpp"

#if RINGFLOW_HAS_NCCL
#include <nccl.h>

#include <string>

#include "ringflow/core/error.hpp"
#include "ringflow/cuda/check.hpp"
#include "ringflow/cuda/nccl.hpp"

namespace rc = ringflow::cuda;

namespace {
bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

/// Restores cuda::error_rank() after a test that sets it.
struct error_rank_scope {
  explicit error_rank_scope(int r) : saved(rc::error_rank()) { rc::set_error_rank(r); }
  ~error_rank_scope() { rc::set_error_rank(saved); }
  int saved;
};
}  // namespace

TEST_CASE("a failed NCCL call throws nccl_error naming the call and rank", "[cuda][nccl]") {
  error_rank_scope rank(7);
  ncclUniqueId id{};
  ncclComm_t comm = nullptr;
  // nranks = 0 is refused before NCCL looks at the id or the GPU.
  try {
    RINGFLOW_CHECK_NCCL(ncclCommInitRank(&comm, 0, id, 0));
    FAIL("ncclCommInitRank with nranks = 0 succeeded");
  } catch (const rc::nccl_error& e) {
    const std::string what = e.what();
    INFO(what);
    CHECK(contains(what, "rank 7"));
    CHECK(contains(what, "ncclCommInitRank"));
    CHECK(contains(what, "ncclInvalidArgument"));
    CHECK(contains(what, ncclGetErrorString(ncclInvalidArgument)));
    CHECK(contains(what, "test_nccl_errors.cpp"));
    CHECK(e.code() == ncclInvalidArgument);
  }
  CHECK(comm == nullptr);
}

TEST_CASE("nccl_error is a comm_error, and an invalid rank is named too", "[cuda][nccl]") {
  error_rank_scope rank(3);
  ncclUniqueId id{};
  ncclComm_t comm = nullptr;
  // Rank 5 of a 2-rank communicator.
  bool caught = false;
  try {
    RINGFLOW_CHECK_NCCL(ncclCommInitRank(&comm, 2, id, 5));
  } catch (const ringflow::comm_error& e) {
    caught = true;
    const std::string what = e.what();
    INFO(what);
    CHECK(contains(what, "rank 3:"));
    CHECK(contains(what, "ncclCommInitRank(&comm, 2, id, 5)"));
    CHECK(dynamic_cast<const rc::nccl_error*>(&e) != nullptr);
  }
  CHECK(caught);
  // RINGFLOW_LOG_NCCL reports without throwing (for destructors).
  CHECK_NOTHROW([&] { RINGFLOW_LOG_NCCL(ncclCommInitRank(&comm, 0, id, 0)); }());
}

TEST_CASE("ringflow dtypes and ops map to NCCL's", "[cuda][nccl]") {
  using ringflow::dtype;
  using ringflow::op_kind;
  CHECK(rc::detail::nccl_type(dtype::f32) == ncclFloat32);
  CHECK(rc::detail::nccl_type(dtype::f64) == ncclFloat64);
  CHECK(rc::detail::nccl_type(dtype::f16) == ncclFloat16);
  CHECK(rc::detail::nccl_type(dtype::bf16) == ncclBfloat16);
  CHECK(rc::detail::nccl_type(dtype::i8) == ncclInt8);
  CHECK(rc::detail::nccl_type(dtype::u8) == ncclUint8);
  CHECK(rc::detail::nccl_type(dtype::i32) == ncclInt32);
  CHECK(rc::detail::nccl_type(dtype::i64) == ncclInt64);
  CHECK(rc::detail::nccl_op(op_kind::sum) == ncclSum);
  CHECK(rc::detail::nccl_op(op_kind::prod) == ncclProd);
  CHECK(rc::detail::nccl_op(op_kind::min) == ncclMin);
  CHECK(rc::detail::nccl_op(op_kind::max) == ncclMax);
  CHECK(rc::detail::nccl_op(op_kind::avg) == ncclAvg);
  CHECK(std::string(rc::detail::nccl_result_name(ncclRemoteError)) == "ncclRemoteError");
}
#endif  // RINGFLOW_HAS_NCCL
