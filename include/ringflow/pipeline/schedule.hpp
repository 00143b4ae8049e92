// Pipeline schedule IR: per-rank instruction lists, generators for GPipe,
// 1F1B and interleaved 1F1B, a text format and a builder for hand-written ones.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace ringflow::pipeline {

/// What one instruction does. Compute ops name a (stage, micro-batch);
/// transfers name the stage on THIS rank whose input/output they move;
/// reduce_grads and optimizer_step concern the whole rank.
enum class op_kind : std::uint8_t {
  forward,          ///< F: run stage s on micro-batch m
  backward,         ///< B: input and weight gradients of (s, m) in one go
  backward_input,   ///< BI: gradient w.r.t. the stage input only (zero-bubble phase B)
  backward_weight,  ///< BW: the deferred weight gradients of (s, m) (phase W)
  send_activation,  ///< SA: send the output of stage s to stage s+1
  recv_activation,  ///< RA: receive the input of stage s from stage s-1
  send_grad,        ///< SG: send the input gradient of stage s to stage s-1
  recv_grad,        ///< RG: receive the output gradient of stage s from stage s+1
  reduce_grads,     ///< REDUCE: average gradients over the data-parallel group
  optimizer_step,   ///< STEP: apply the optimizer
};

/// "forward", "backward_input", ...
std::string_view op_name(op_kind op);
/// The token used by the text format: "F", "B", "BI", "BW", "SA", "RA", "SG", "RG", "REDUCE",
/// "STEP".
std::string_view op_mnemonic(op_kind op);
/// True for forward, backward, backward_input and backward_weight.
bool is_compute(op_kind op);
/// True for recv_activation and recv_grad.
bool is_recv(op_kind op);
/// True for send_activation and send_grad.
bool is_send(op_kind op);

/// One step of a rank's program. stage and micro_batch are -1 for
/// reduce_grads and optimizer_step.
struct instruction {
  op_kind op = op_kind::forward;
  int stage = -1;
  int micro_batch = -1;
  friend bool operator==(const instruction&, const instruction&) = default;
};

/// "F1.3" (op, stage, micro-batch), "REDUCE", "STEP".
std::string to_string(const instruction& ins);

/// A whole pipeline step: which rank holds each stage and what every rank
/// does, in order. Plain data: build one by hand, with schedule_builder,
/// from text (parse_schedule) or with a generator below.
///
/// Stages are numbered 0..stages()-1 along the model. With v model chunks
/// per rank (interleaved), stage s lives on rank s % ranks.
struct schedule {
  std::string name = "custom";
  int micro_batches = 0;
  /// stage_rank[s] = the rank that runs stage s.
  std::vector<int> stage_rank;
  /// programs[r] = the instructions of rank r, executed in order.
  std::vector<std::vector<instruction>> programs;
  /// An inference pass: forwards only, no backward is required.
  bool forward_only = false;

  int ranks() const { return static_cast<int>(programs.size()); }
  int stages() const { return static_cast<int>(stage_rank.size()); }
  /// The rank of stage s (throws usage_error when out of range).
  int rank_of(int stage) const;
  /// The stages on `rank`, in model order.
  std::vector<int> stages_on(int rank) const;
};

/// Options of the generators.
struct generate_options {
  /// Emit backward as BI, SG, BW (the gradient goes upstream before the
  /// weight gradients are computed) instead of one B followed by SG.
  bool split_backward = false;
  /// Append REDUCE and STEP to every rank's program.
  bool reduce_and_step = true;
};

/// GPipe: all forwards, then all backwards (micro-batch order), per rank.
/// Peak in-flight activations: m on every rank.
schedule gpipe(int ranks, int micro_batches, generate_options opts = {});

/// 1F1B (PipeDream-Flush): rank r runs min(p-r-1, m) warm-up forwards, then
/// alternates one forward and one backward, then drains. Same bubble as
/// GPipe, peak in-flight activations min(p-r, m) instead of m.
schedule one_f_one_b(int ranks, int micro_batches, generate_options opts = {});

/// Interleaved 1F1B (Megatron-LM): `chunks` model chunks per rank, stage s
/// on rank s % ranks, micro-batches in groups of `ranks`. Cuts the bubble by
/// about a factor `chunks` at the price of `chunks` times more transfers.
/// Works for any micro-batch count (the warm-up is lengthened where the
/// textbook count would deadlock, which the verifier decides).
schedule interleaved_1f1b(int ranks, int chunks, int micro_batches, generate_options opts = {});

/// A forward-only pass over the given placement (evaluation): per rank, in
/// stage order, each micro-batch's RA, F, SA.
schedule forward_pass(std::vector<int> stage_rank, int ranks, int micro_batches);

/// Generator by name: "gpipe", "1f1b" or "interleaved" (chunks used only by
/// the last). Throws usage_error naming the known kinds.
schedule make_schedule(std::string_view kind, int ranks, int micro_batches, int chunks = 2,
                       generate_options opts = {});

/// The text form, one header line, one placement line, one line per rank:
/// @code
///   schedule 1f1b micro_batches 2
///   placement 0 1
///   rank 0: F0.0 SA0.0 F0.1 SA0.1 RG0.0 B0.0 RG0.1 B0.1 REDUCE STEP
///   rank 1: RA1.0 F1.0 B1.0 SG1.0 RA1.1 F1.1 B1.1 SG1.1 REDUCE STEP
/// @endcode
/// Tokens are <mnemonic><stage>.<micro-batch>; '#' starts a comment; a
/// rank's instructions may continue on the following lines.
std::string to_text(const schedule& s);
/// Parses to_text's format; throws usage_error naming the line and token.
/// Bounds: micro_batches in [1, 2^20], ranks and placement entries below
/// 2^16, instruction stages below 2^16 and micro-batches below 2^20.
schedule parse_schedule(std::string_view text);

/// Builds a schedule by hand, instruction by instruction.
/// @code
///   pipeline::schedule_builder b(/*ranks=*/2, /*stages=*/2, /*micro_batches=*/1);
///   b.on(0).forward(0, 0).send_activation(0, 0).recv_grad(0, 0).backward(0, 0);
///   b.on(1).recv_activation(1, 0).forward(1, 0).backward(1, 0).send_grad(1, 0);
///   pipeline::schedule s = b.build();
/// @endcode
class schedule_builder {
 public:
  /// Stage s on rank s % ranks.
  schedule_builder(int ranks, int stages, int micro_batches);
  /// Appends to `rank` from now on.
  schedule_builder& on(int rank);
  schedule_builder& add(instruction ins);
  schedule_builder& forward(int stage, int mb) { return add({op_kind::forward, stage, mb}); }
  schedule_builder& backward(int stage, int mb) { return add({op_kind::backward, stage, mb}); }
  schedule_builder& backward_input(int stage, int mb) {
    return add({op_kind::backward_input, stage, mb});
  }
  schedule_builder& backward_weight(int stage, int mb) {
    return add({op_kind::backward_weight, stage, mb});
  }
  schedule_builder& send_activation(int stage, int mb) {
    return add({op_kind::send_activation, stage, mb});
  }
  schedule_builder& recv_activation(int stage, int mb) {
    return add({op_kind::recv_activation, stage, mb});
  }
  schedule_builder& send_grad(int stage, int mb) { return add({op_kind::send_grad, stage, mb}); }
  schedule_builder& recv_grad(int stage, int mb) { return add({op_kind::recv_grad, stage, mb}); }
  schedule_builder& reduce_grads() { return add({op_kind::reduce_grads, -1, -1}); }
  schedule_builder& optimizer_step() { return add({op_kind::optimizer_step, -1, -1}); }
  schedule build() const { return schedule_; }

 private:
  schedule schedule_;
  int current_ = 0;
};

}  // namespace ringflow::pipeline
