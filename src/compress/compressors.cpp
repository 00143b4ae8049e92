// CPU reference implementations of the compressors (all but PowerSGD, which
// lives in powersgd.cpp): loops over the per-element functors of kernels.hpp.
#include <fmt/format.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstring>
#include <limits>

#include "ringflow/coll/collectives.hpp"
#include "ringflow/compress/compressor.hpp"
#include "ringflow/compress/cpu_codec.hpp"
#include "ringflow/compress/half_codec.hpp"
#include "ringflow/compress/kernels.hpp"
#include "ringflow/core/error.hpp"

namespace ringflow::compress {

namespace {

void check_payload(const compressor& c, std::size_t got, std::size_t n, const char* what) {
  if (got != c.payload_bytes(n)) {
    throw usage_error(fmt::format("{} {}: payload has {} bytes, but {} elements need {}", c.name(),
                                  what, got, n, c.payload_bytes(n)));
  }
}

void check_not_empty(const compressor& c, std::size_t n, const char* what) {
  if (n == 0) {
    throw usage_error(fmt::format(
        "{} {}: the tensor is empty; compression needs at least one element (skip empty buckets)",
        c.name(), what));
  }
}

void check_mine(std::span<float> mine, std::size_t n, const compressor& c) {
  if (!mine.empty() && mine.size() != n) {
    throw usage_error(
        fmt::format("{} reduce: `mine` has {} elements, data {}", c.name(), mine.size(), n));
  }
}

std::size_t ceil_div(std::size_t a, std::size_t b) { return (a + b - 1) / b; }

// Byte views of a payload; the payload buffers are byte arrays, which C++20
// lets hold floats and words written by memcpy or through these pointers.
template <class T>
T* as(std::span<std::byte> s, std::size_t byte_offset = 0) {
  return reinterpret_cast<T*>(s.data() + byte_offset);
}
template <class T>
const T* as(std::span<const std::byte> s, std::size_t byte_offset = 0) {
  return reinterpret_cast<const T*>(s.data() + byte_offset);
}

// max |x| of a block; NaN if the block holds one (so the shared scale, and
// with it the decoded block, becomes NaN on every rank instead of hiding it):
// the max of the |x| bit patterns, which order like the magnitudes, with a
// NaN's bits above +Inf's (cpu_codec.hpp: vector loops where the CPU has them).
float block_absmax(const float* x, std::size_t n) { return cpu::block_absmax(x, n); }

std::span<std::byte> bytes_of(std::vector<std::uint8_t>& v) {
  return std::as_writable_bytes(std::span(v));
}

}  // namespace

// ---------------------------------------------------------------------------

std::size_t ring_bytes_sent(const wire_round& round, int ranks, int rank) {
  if (ranks <= 1) return 0;
  const auto p = static_cast<std::size_t>(ranks);
  if (round.kind == combine::gather) return (p - 1) * round.bytes;
  const std::size_t es = round.element_size ? round.element_size : 1;
  const std::size_t count = round.bytes / es;
  const std::size_t own = partition(count, ranks, rank).count;
  const std::size_t next = partition(count, ranks, (rank + 1) % ranks).count;
  return es * ((count - own) + (count - next));
}

traffic& traffic::operator+=(const traffic& o) {
  calls += o.calls;
  elements += o.elements;
  raw_bytes += o.raw_bytes;
  payload_bytes += o.payload_bytes;
  bytes_sent += o.bytes_sent;
  plain_bytes_sent += o.plain_bytes_sent;
  return *this;
}

double traffic::ratio() const {
  return payload_bytes ? static_cast<double>(raw_bytes) / static_cast<double>(payload_bytes) : 0.0;
}

void compressor::decode(std::span<const std::byte> payload, std::span<float> out) const {
  std::fill(out.begin(), out.end(), 0.0f);
  decode_add(payload, out);
}

void bucket_layout::validate() const {
  // Sorted by offset, two neighbours overlap iff some pair does.
  std::vector<std::size_t> order(tensors.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const tensor_shape& t = tensors[i];
    if (t.rows == 0 || t.cols == 0) {
      throw usage_error(
          fmt::format("bucket layout: tensor {} is empty ({} x {} at offset {}); leave "
                      "empty tensors out of the layout",
                      i, t.rows, t.cols, t.offset));
    }
    if (t.cols > std::numeric_limits<std::size_t>::max() / t.rows || t.offset > size ||
        t.size() > size - t.offset) {
      throw usage_error(fmt::format(
          "bucket layout: tensor {} ({} x {} at offset {}) reaches outside the bucket of {} "
          "elements; offsets are relative to the bucket's first element",
          i, t.rows, t.cols, t.offset, size));
    }
  }
  std::sort(order.begin(), order.end(),
            [&](std::size_t a, std::size_t b) { return tensors[a].offset < tensors[b].offset; });
  for (std::size_t k = 1; k < order.size(); ++k) {
    const tensor_shape& a = tensors[order[k - 1]];
    const tensor_shape& b = tensors[order[k]];
    if (a.offset + a.size() > b.offset) {
      throw usage_error(fmt::format(
          "bucket layout: tensors {} ({} x {} at offset {}) and {} ({} x {} at offset {}) overlap; "
          "every element belongs to at most one tensor",
          order[k - 1], a.rows, a.cols, a.offset, order[k], b.rows, b.cols, b.offset));
    }
  }
}

void compressor::load_state(const compressor_state& s) {
  if (s.counter != 0 || !s.warm_start.empty()) {
    throw usage_error(fmt::format(
        "{}: load_state got a counter of {} and {} warm starts, but this compressor keeps no "
        "state (saved by another compressor?)",
        name(), s.counter, s.warm_start.size()));
  }
}

namespace {
void check_counter_only(const compressor& c, const compressor_state& s) {
  if (!s.warm_start.empty()) {
    throw usage_error(fmt::format(
        "{}: load_state got {} warm starts, but this compressor keeps only a call counter (saved "
        "by PowerSGD?)",
        c.name(), s.warm_start.size()));
  }
}
}  // namespace

void int8_compressor::load_state(const compressor_state& s) {
  check_counter_only(*this, s);
  step_ = s.counter;
}

void topk_compressor::load_state(const compressor_state& s) {
  check_counter_only(*this, s);
  step_ = s.counter;
}

void compressor::set_layout(bucket_layout layout) {
  layout.validate();
  layout_ = std::move(layout);
}

void compressor::account(std::size_t n, const communicator& comm, traffic& stats) {
  traffic t;
  t.calls = 1;
  t.elements = n;
  t.raw_bytes = 4 * n;
  t.payload_bytes = payload_bytes(n);
  for (const wire_round& w : wire_plan(n, comm.size())) {
    t.bytes_sent += ring_bytes_sent(w, comm.size(), comm.rank());
  }
  t.plain_bytes_sent =
      ring_bytes_sent(wire_round{combine::sum, 4 * n, 4}, comm.size(), comm.rank());
  stats += t;
  cumulative_ += t;
}

// ---------------------------------------------------------------------------
// none

std::vector<wire_round> none_compressor::wire_plan(std::size_t n, int) const {
  return {wire_round{combine::sum, 4 * n, 4}};
}

void none_compressor::encode(std::span<const float> in, std::span<std::byte> out, std::uint64_t) {
  check_not_empty(*this, in.size(), "encode");
  check_payload(*this, out.size(), in.size(), "encode");
  std::memcpy(out.data(), in.data(), in.size_bytes());
}

void none_compressor::decode_add(std::span<const std::byte> payload, std::span<float> out) const {
  check_payload(*this, payload.size(), out.size(), "decode");
  cpu::add(as<float>(payload), out.data(), out.size());
}

void none_compressor::reduce(const communicator& comm, std::span<float> data, std::span<float> mine,
                             std::uint64_t, traffic& stats) {
  check_not_empty(*this, data.size(), "reduce");
  check_mine(mine, data.size(), *this);
  if (!mine.empty()) std::copy(data.begin(), data.end(), mine.begin());
  allreduce(comm, data, sum, algo::ring);
  account(data.size(), comm, stats);
}

void none_compressor::average(const communicator& comm, std::span<float> data,
                              const coll_options& opt, traffic& stats) {
  check_not_empty(*this, data.size(), "average");
  allreduce(comm, data, avg, opt);
  account(data.size(), comm, stats);
}

// ---------------------------------------------------------------------------
// fp16 / bf16

std::vector<wire_round> half_compressor::wire_plan(std::size_t n, int) const {
  return {wire_round{combine::sum, 2 * n, 2}};
}

void half_compressor::encode(std::span<const float> in, std::span<std::byte> out, std::uint64_t) {
  check_not_empty(*this, in.size(), "encode");
  check_payload(*this, out.size(), in.size(), "encode");
  auto* w = as<std::uint16_t>(out);
  if (format_ == format::fp16) {
    encode_fp16(in, std::span<std::uint16_t>(w, in.size()));  // F16C where the CPU has it
  } else {
    cpu::encode_bf16(in.data(), w, in.size());
  }
}

void half_compressor::decode_add(std::span<const std::byte> payload, std::span<float> out) const {
  check_payload(*this, payload.size(), out.size(), "decode");
  const auto* w = as<std::uint16_t>(payload);
  if (format_ == format::fp16) {
    decode_fp16(std::span<const std::uint16_t>(w, out.size()), out, /*add=*/true);
  } else {
    cpu::decode_bf16(w, out.data(), out.size(), /*add=*/true);
  }
}

void half_compressor::reduce(const communicator& comm, std::span<float> data, std::span<float> mine,
                             std::uint64_t, traffic& stats) {
  const std::size_t n = data.size();
  check_not_empty(*this, n, "reduce");
  check_mine(mine, n, *this);
  // The ring sums in the 16-bit type: sum_op adds in fp32 and rounds back
  // to 16 bits at every hop (core/reduce_op.hpp).
  if (format_ == format::fp16) {
    wire_fp16_.resize(n);
    // `half` is one uint16_t of bits: convert the whole buffer in one batch.
    const std::span<std::uint16_t> bits(&wire_fp16_.data()->bits, n);
    encode_fp16(data, bits);
    if (!mine.empty()) decode_fp16(bits, mine);
    allreduce(comm, std::span<half>(wire_fp16_), sum, algo::ring);
    decode_fp16(bits, data);
  } else {
    wire_bf16_.resize(n);
    std::uint16_t* bits = &wire_bf16_.data()->bits;
    cpu::encode_bf16(data.data(), bits, n);
    if (!mine.empty()) cpu::decode_bf16(bits, mine.data(), n, /*add=*/false);
    allreduce(comm, std::span<bfloat16>(wire_bf16_), sum, algo::ring);
    cpu::decode_bf16(bits, data.data(), n, /*add=*/false);
  }
  account(n, comm, stats);
}

// ---------------------------------------------------------------------------
// int8

int8_compressor::int8_compressor(std::size_t block, std::uint64_t seed)
    : block_(block), seed_(seed) {
  if (block == 0) throw usage_error("int8 compressor: block must be >= 1 element, got 0");
}

std::string int8_compressor::name() const {
  return block_ == 256 ? "int8" : fmt::format("int8:{}", block_);
}

std::size_t int8_compressor::payload_bytes(std::size_t n) const {
  return 4 * ceil_div(n, block_) + n;
}

std::vector<wire_round> int8_compressor::wire_plan(std::size_t n, int) const {
  return {wire_round{combine::sum, 4 * ceil_div(n, block_), 4}, wire_round{combine::sum, n, 1}};
}

void int8_compressor::encode(std::span<const float> in, std::span<std::byte> out, std::uint64_t) {
  const std::size_t n = in.size();
  check_not_empty(*this, n, "encode");
  check_payload(*this, out.size(), n, "encode");
  const std::size_t nb = ceil_div(n, block_);
  float* scales = as<float>(out);
  auto* q = as<std::int8_t>(out, 4 * nb);
  const std::uint64_t key = kernels::stream_key(seed_, step_++, 0);
  for (std::size_t b = 0; b < nb; ++b) {
    const std::size_t lo = b * block_, hi = std::min(n, lo + block_);
    scales[b] = block_absmax(in.data() + lo, hi - lo);
    const kernels::quantize_int8 quant{kernels::int8_inv_step(scales[b], 127), 127, key};
    cpu::quantize_int8(in.data() + lo, q + lo, hi - lo, lo, quant);
  }
}

void int8_compressor::decode_add(std::span<const std::byte> payload, std::span<float> out) const {
  const std::size_t n = out.size();
  check_payload(*this, payload.size(), n, "decode");
  const std::size_t nb = ceil_div(n, block_);
  const float* scales = as<float>(payload);
  const auto* q = as<std::int8_t>(payload, 4 * nb);
  for (std::size_t b = 0; b < nb; ++b) {
    const std::size_t lo = b * block_, hi = std::min(n, lo + block_);
    cpu::dequantize_int8(q + lo, out.data() + lo, hi - lo, kernels::int8_step(scales[b], 127),
                         /*add=*/true);
  }
}

void int8_compressor::reduce(const communicator& comm, std::span<float> data, std::span<float> mine,
                             std::uint64_t, traffic& stats) {
  const std::size_t n = data.size();
  check_not_empty(*this, n, "reduce");
  check_mine(mine, n, *this);
  const int p = comm.size();
  if (p > 127) {
    throw not_supported_error(fmt::format(
        "int8 compressor on rank {}: {} ranks leave no int8 levels (L = floor(127 / ranks) = 0); "
        "use bf16 or topk beyond 127 ranks",
        comm.rank(), p));
  }
  const int levels = 127 / p;
  const std::size_t nb = ceil_div(n, block_);
  // 1. Agree on one scale per block: the max over ranks of max |x|.
  scales_.resize(nb);
  for (std::size_t b = 0; b < nb; ++b) {
    const std::size_t lo = b * block_, hi = std::min(n, lo + block_);
    scales_[b] = block_absmax(data.data() + lo, hi - lo);
  }
  allreduce(comm, std::span<float>(scales_), max, algo::ring);
  // 2. Quantize to [-L, L] with the shared scale; every rank draws its own
  //    random stream (independent rounding errors average down in the sum).
  q_.resize(n);
  const std::uint64_t key =
      kernels::stream_key(seed_, step_++, static_cast<std::uint64_t>(comm.rank()));
  for (std::size_t b = 0; b < nb; ++b) {
    const std::size_t lo = b * block_, hi = std::min(n, lo + block_);
    const kernels::quantize_int8 quant{kernels::int8_inv_step(scales_[b], levels), levels, key};
    cpu::quantize_int8(data.data() + lo, q_.data() + lo, hi - lo, lo, quant);
    if (!mine.empty()) {
      cpu::dequantize_int8(q_.data() + lo, mine.data() + lo, hi - lo,
                           kernels::int8_step(scales_[b], levels), /*add=*/false);
    }
  }
  // 3. Integer sum: exact and order independent, so every rank gets the same bits.
  allreduce(comm, std::span<std::int8_t>(q_), sum, algo::ring);
  for (std::size_t b = 0; b < nb; ++b) {
    const std::size_t lo = b * block_, hi = std::min(n, lo + block_);
    cpu::dequantize_int8(q_.data() + lo, data.data() + lo, hi - lo,
                         kernels::int8_step(scales_[b], levels), /*add=*/false);
  }
  account(n, comm, stats);
}

// ---------------------------------------------------------------------------
// top-k

topk_compressor::topk_compressor(double ratio, std::uint64_t seed, std::size_t exact_limit)
    : ratio_(ratio), seed_(seed), exact_limit_(exact_limit) {
  if (!(ratio > 0.0 && ratio <= 1.0)) {
    throw usage_error(
        fmt::format("topk compressor: ratio must be in (0, 1], got {} (e.g. topk:0.01)", ratio));
  }
}

std::string topk_compressor::name() const { return fmt::format("topk:{}", ratio_); }

std::size_t topk_compressor::k(std::size_t n) const {
  if (n == 0) return 0;
  // ceil(ratio * n), guarded so that 0.01 * 1000 gives 10, not 11.
  const double kk = ratio_ * static_cast<double>(n);
  auto k = static_cast<std::size_t>(kk);
  if (kk - static_cast<double>(k) > 1e-9 * kk) ++k;
  return std::clamp<std::size_t>(k, 1, n);
}

std::vector<wire_round> topk_compressor::wire_plan(std::size_t n, int) const {
  return {wire_round{combine::gather, 8 * k(n), 1}};
}

void topk_compressor::encode(std::span<const float> in, std::span<std::byte> out, std::uint64_t) {
  const std::size_t n = in.size();
  check_not_empty(*this, n, "encode");
  check_payload(*this, out.size(), n, "encode");
  if (n > std::numeric_limits<std::uint32_t>::max()) {
    throw usage_error(fmt::format("topk encode: {} elements exceed the uint32 index range", n));
  }
  const std::size_t kk = k(n);
  // Larger magnitude first; ties go to the lower index (deterministic).
  auto before = [&](std::uint32_t a, std::uint32_t b) {
    const std::uint32_t ka = kernels::magnitude_key(in[a]), kb = kernels::magnitude_key(in[b]);
    return ka > kb || (ka == kb && a < b);
  };
  auto exact = [&] {
    idx_.resize(n);
    for (std::size_t i = 0; i < n; ++i) idx_[i] = static_cast<std::uint32_t>(i);
    if (kk < n)
      std::nth_element(idx_.begin(), idx_.begin() + static_cast<std::ptrdiff_t>(kk), idx_.end(),
                       before);
    idx_.resize(kk);
  };
  const std::uint64_t step = step_++;
  if (n <= exact_limit_ || 4 * kk >= n) {
    exact();
  } else {
    // Estimate the threshold from a sample, aiming at 2k candidates; selecting
    // among the candidates is exact as soon as at least k passed, because
    // every non-candidate is below every candidate.
    const std::size_t m = 8192;
    const std::uint64_t key = kernels::stream_key(seed_, step, kernels::topk_sample_stream);
    std::vector<std::uint32_t> sample(m);
    for (std::size_t j = 0; j < m; ++j) {
      auto i = static_cast<std::size_t>(kernels::uniform01(key, j) * static_cast<float>(n));
      sample[j] = kernels::magnitude_key(in[std::min(i, n - 1)]);
    }
    const double want = 2.0 * static_cast<double>(kk) / static_cast<double>(n);
    const auto pos = static_cast<std::size_t>(want * static_cast<double>(m));
    std::nth_element(sample.begin(), sample.begin() + static_cast<std::ptrdiff_t>(pos),
                     sample.end(), std::greater<>());
    const std::uint32_t threshold = sample[pos];
    idx_.clear();
    for (std::size_t i = 0; i < n; ++i) {
      if (kernels::magnitude_key(in[i]) >= threshold) idx_.push_back(static_cast<std::uint32_t>(i));
    }
    if (idx_.size() >= kk) {
      std::nth_element(idx_.begin(), idx_.begin() + static_cast<std::ptrdiff_t>(kk), idx_.end(),
                       before);
      idx_.resize(kk);
    } else {
      exact();  // unlucky sample: too few candidates
    }
  }
  std::sort(idx_.begin(), idx_.end());
  auto* oi = as<std::uint32_t>(out);
  auto* ov = as<float>(out, 4 * kk);
  for (std::size_t j = 0; j < kk; ++j) {
    oi[j] = idx_[j];
    ov[j] = in[idx_[j]];
  }
}

void topk_compressor::decode_add(std::span<const std::byte> payload, std::span<float> out) const {
  const std::size_t n = out.size();
  check_payload(*this, payload.size(), n, "decode");
  const std::size_t kk = k(n);
  const auto* idx = as<std::uint32_t>(payload);
  const float* val = as<float>(payload, 4 * kk);
  for (std::size_t j = 0; j < kk; ++j) {
    if (idx[j] >= n) {
      throw error(fmt::format(
          "topk decode: index {} out of range for {} elements (corrupt payload)", idx[j], n));
    }
    out[idx[j]] += val[j];
  }
}

void gather_compressor::reduce(const communicator& comm, std::span<float> data,
                               std::span<float> mine, std::uint64_t bucket_id, traffic& stats) {
  const std::size_t n = data.size();
  check_not_empty(*this, n, "reduce");
  check_mine(mine, n, *this);
  const std::size_t pb = payload_bytes(n);
  send_.resize(pb);
  encode(data, bytes_of(send_), bucket_id);
  if (!mine.empty()) decode(std::as_bytes(std::span(send_)), mine);
  recv_.resize(pb * static_cast<std::size_t>(comm.size()));
  allgather<std::uint8_t>(comm, send_, recv_, coll_options{algo::ring, 0});
  std::fill(data.begin(), data.end(), 0.0f);
  // Rank order is fixed, so every rank adds the same values in the same order.
  for (int r = 0; r < comm.size(); ++r) {
    decode_add(std::as_bytes(std::span(recv_).subspan(pb * static_cast<std::size_t>(r), pb)), data);
  }
  account(n, comm, stats);
}

// ---------------------------------------------------------------------------
// 1-bit sign

sign_compressor::sign_compressor(std::size_t block) : block_(block) {
  if (block == 0 || block % 32 != 0) {
    throw usage_error(fmt::format(
        "sign compressor: block must be a positive multiple of 32 elements, got {}", block));
  }
}

std::string sign_compressor::name() const {
  return block_ == 256 ? "sign" : fmt::format("sign:{}", block_);
}

std::size_t sign_compressor::payload_bytes(std::size_t n) const {
  return 4 * ceil_div(n, block_) + 4 * ceil_div(n, 32);
}

std::vector<wire_round> sign_compressor::wire_plan(std::size_t n, int) const {
  return {wire_round{combine::gather, payload_bytes(n), 1}};
}

void sign_compressor::encode(std::span<const float> in, std::span<std::byte> out, std::uint64_t) {
  const std::size_t n = in.size();
  check_not_empty(*this, n, "encode");
  check_payload(*this, out.size(), n, "encode");
  const std::size_t nb = ceil_div(n, block_);
  float* scales = as<float>(out);
  auto* words = as<std::uint32_t>(out, 4 * nb);
  // One pass: a block's scale and its sign words while the block is in L1.
  for (std::size_t b = 0; b < nb; ++b) {
    const std::size_t lo = b * block_, hi = std::min(n, lo + block_);
    // Summed in the canonical order of kernels::abs_sum_block, which the GPU
    // kernel (one warp per block) reproduces bit for bit. A NaN in the block
    // makes the scale (and the decoded block) NaN.
    scales[b] = cpu::abs_sum_block(in.data() + lo, hi - lo) / static_cast<float>(hi - lo);
    cpu::pack_signs(in.data() + lo, words + lo / 32, hi - lo);  // lo is a multiple of 32
  }
}

void sign_compressor::decode_add(std::span<const std::byte> payload, std::span<float> out) const {
  const std::size_t n = out.size();
  check_payload(*this, payload.size(), n, "decode");
  const std::size_t nb = ceil_div(n, block_);
  const float* scales = as<float>(payload);
  const auto* words = as<std::uint32_t>(payload, 4 * nb);
  // Block by block (a multiple of 32 elements, so every block starts a word).
  for (std::size_t b = 0; b < nb; ++b) {
    const std::size_t lo = b * block_, hi = std::min(n, lo + block_);
    cpu::unpack_signs_add(words + lo / 32, out.data() + lo, hi - lo, scales[b]);
  }
}

// ---------------------------------------------------------------------------
// spec parsing

namespace {
template <class T>
T parse_number(std::string_view text, std::string_view spec, const char* what) {
  T v{};
  if constexpr (std::is_floating_point_v<T>) {
    // std::from_chars for double is in libstdc++ 11+, fine with g++ 12.
    auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
    if (ec != std::errc() || p != text.data() + text.size()) {
      throw usage_error(fmt::format("compressor '{}': {} '{}' is not a number", spec, what, text));
    }
  } else {
    long long x = 0;
    auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), x);
    if (ec != std::errc() || p != text.data() + text.size()) {
      throw usage_error(
          fmt::format("compressor '{}': {} '{}' is not an integer", spec, what, text));
    }
    if (x < 0) {
      throw usage_error(fmt::format("compressor '{}': {} must be >= 0, got {}", spec, what, x));
    }
    v = static_cast<T>(x);
  }
  return v;
}
}  // namespace

std::unique_ptr<compressor> make_compressor(std::string_view spec, std::uint64_t seed) {
  const auto colon = spec.find(':');
  const std::string_view kind = spec.substr(0, colon);
  const std::string_view arg = colon == std::string_view::npos ? "" : spec.substr(colon + 1);
  auto no_arg = [&] {
    if (colon != std::string_view::npos) {
      throw usage_error(fmt::format("compressor '{}': '{}' takes no parameter", spec, kind));
    }
  };
  if (kind == "none") return no_arg(), std::make_unique<none_compressor>();
  if (kind == "fp16")
    return no_arg(), std::make_unique<half_compressor>(half_compressor::format::fp16);
  if (kind == "bf16")
    return no_arg(), std::make_unique<half_compressor>(half_compressor::format::bf16);
  if (kind == "int8") {
    return std::make_unique<int8_compressor>(
        arg.empty() ? 256 : parse_number<std::size_t>(arg, spec, "block"), seed);
  }
  if (kind == "sign") {
    return std::make_unique<sign_compressor>(
        arg.empty() ? 256 : parse_number<std::size_t>(arg, spec, "block"));
  }
  if (kind == "topk") {
    if (arg.empty())
      throw usage_error(fmt::format("compressor '{}': topk needs a ratio, e.g. topk:0.01", spec));
    return std::make_unique<topk_compressor>(parse_number<double>(arg, spec, "ratio"), seed);
  }
  if (kind == "powersgd") {
    if (arg.empty())
      throw usage_error(
          fmt::format("compressor '{}': powersgd needs a rank, e.g. powersgd:4", spec));
    const auto r = parse_number<std::size_t>(arg, spec, "rank");
    if (r > 1u << 20)
      throw usage_error(
          fmt::format("compressor '{}': powersgd rank {} is absurdly large", spec, r));
    return std::make_unique<powersgd_compressor>(static_cast<int>(r), seed);
  }
  throw usage_error(
      fmt::format("unknown compressor '{}': expected none, fp16, bf16, int8[:block], topk:<ratio>, "
                  "sign[:block] or powersgd:<rank>",
                  spec));
}

}  // namespace ringflow::compress
