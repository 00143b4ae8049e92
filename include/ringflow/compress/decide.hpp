// Deciding where compression pays: an alpha-beta model of the ring
// collectives plus measured encode/decode speed, per bucket, and the `auto`
// policy built on it.
#pragma once

#include <cstddef>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "ringflow/coll/cost_model.hpp"
#include "ringflow/compress/compressor.hpp"

namespace ringflow::compress {

/// A link in the alpha-beta model: one message of b bytes takes
/// alpha_s + b * beta_s_per_byte.
struct link_model {
  double alpha_s = 20e-6;               ///< per-message latency
  double beta_s_per_byte = 8.0 / 10e9;  ///< 10 Gb/s

  /// A link of `gbps` gigabits per second and `alpha_us` microseconds latency.
  static link_model from_gbps(double gbps, double alpha_us = 20.0);
  /// From RINGFLOW_LINK_GBPS and RINGFLOW_LINK_ALPHA_US (defaults 10 and 20).
  static link_model from_env();
  /// The inter-node link of the collectives' cost model (coll/cost_model.hpp).
  static link_model from_cost_model(const cost_model& m);
  /// What `auto` plans for by default: RINGFLOW_LINK_GBPS (and _ALPHA_US) when
  /// set, else the inter-node link of local_cost_model() (the calibrated model
  /// of this machine, or the built-in one).
  static link_model for_this_machine();
};

/// Predicted time of one ring collective (ringflow's ring, unsegmented):
/// allreduce of B bytes: 2(p-1) alpha + 2(p-1)/p * B * beta;
/// allgather of p pieces of b bytes: (p-1) alpha + (p-1) * b * beta.
double predict_round(const link_model& link, const wire_round& round, int ranks);

/// Codec speed of a compressor on this machine, in GB/s of fp32 input
/// (4 bytes per element, whatever the payload size).
struct codec_speed {
  double encode_gbps = 0;  ///< encode() of one bucket
  double decode_gbps = 0;  ///< decode_add() of one payload
};

/// Times encode and decode_add of `c` on n pseudo-random floats; the median
/// of `reps` runs after one warm-up.
codec_speed measure_codec(compressor& c, std::size_t n, int reps = 5);

/// Predicted time of one bucket, plain fp32 allreduce vs compressed.
struct prediction {
  double plain_s = 0;  ///< fp32 ring allreduce
  double wire_s = 0;   ///< the compressor's collectives
  double codec_s = 0;  ///< encode + the decodes (p of them for allgather)
  double compressed_s() const { return wire_s + codec_s; }
  double speedup() const { return compressed_s() > 0 ? plain_s / compressed_s() : 0; }
};

/// codec_s = 4n/encode + d * 4n/decode, d = 1 for combine::sum and `ranks`
/// for combine::gather (each rank decodes every rank's payload).
prediction predict(const compressor& c, std::size_t n, int ranks, const link_model& link,
                   const codec_speed& speed);

/// The link bandwidth, in GB/s (bytes), below which compressing a bucket of
/// n elements with `c` is predicted to beat the plain fp32 allreduce by
/// `margin` (0: at all; auto_policy uses 0.1), on links of latency alpha_s.
/// Both times are linear in beta = 1/bandwidth, so the crossover is
///   beta* = (A_c + codec_s - (1 - margin) A_p) / ((1 - margin) B_p - B_c)
/// with A the alpha terms and B the bytes-times-beta terms of each side.
/// Returns 0 where compression never wins (it sends no fewer bytes, e.g.
/// top-k's allgather at many ranks) and +infinity where it wins at any speed.
///
/// @code
/// double gbps = break_even_gbps(*make_compressor("bf16"), 1 << 20, 16, 20e-6, speed);
/// // bf16 pays on links slower than `gbps` GB/s (8 * gbps Gb/s)
/// @endcode
double break_even_gbps(const compressor& c, std::size_t n, int ranks, double alpha_s,
                       const codec_speed& speed, double margin = 0.0);

/// The `auto` policy: per bucket, the candidate with the lowest predicted
/// time, but only where it beats the plain fp32 allreduce by `margin`
/// (a fraction: 0.1 = 10% faster); otherwise "none".
///
/// @code
/// ringflow::compress::auto_policy pol(link_model::from_gbps(10), comm.size());
/// pol.calibrate();                        // measures the candidates' codecs here
/// auto c = ringflow::compress::make_compressor(pol.choose(bucket.size()));
/// @endcode
class auto_policy {
 public:
  auto_policy(link_model link, int ranks, std::vector<std::string> candidates = {"bf16", "int8"},
              double margin = 0.1);
  /// Measures every candidate's codec speed on n elements (a second or less).
  void calibrate(std::size_t n = std::size_t{1} << 20);
  /// Sets a candidate's codec speed (instead of measuring it).
  void set_speed(const std::string& spec, codec_speed s) { speed_[spec] = s; }
  /// The spec to use for a bucket of n elements ("none" where nothing wins).
  std::string choose(std::size_t n) const;
  /// The predictions for every candidate (calibrate() or set_speed() first).
  std::map<std::string, prediction> predictions(std::size_t n) const;
  /// For every candidate, the link GB/s below which auto would pick it over
  /// none for a bucket of n elements (break_even_gbps with this policy's
  /// alpha and margin): where this machine's codecs start to pay.
  std::map<std::string, double> break_even(std::size_t n) const;
  const std::vector<std::string>& candidates() const noexcept { return candidates_; }

 private:
  link_model link_;
  int ranks_;
  std::vector<std::string> candidates_;
  double margin_;
  std::map<std::string, codec_speed> speed_;
  std::map<std::string, std::unique_ptr<compressor>> probes_;  // for wire_plan()
};

}  // namespace ringflow::compress
