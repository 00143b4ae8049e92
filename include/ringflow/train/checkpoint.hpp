// Checkpoints: parameters, optimizer state (sharded state gathered into the full layout), sampler
// state, step and per-rank compression state in one atomically written, checksummed file.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "ringflow/ad/optim.hpp"
#include "ringflow/ad/parameter_store.hpp"
#include "ringflow/coll/partition.hpp"
#include "ringflow/comm/communicator.hpp"
#include "ringflow/compress/bucket_compression.hpp"
#include "ringflow/core/error.hpp"
#include "ringflow/data/sampler.hpp"

namespace ringflow::train {

/// A checkpoint file is missing, corrupt, truncated, of another format
/// version, or does not match the model it is loaded into; or it could not be
/// written. The message names the file and the problem.
class checkpoint_error : public error {
 public:
  using error::error;
};

/// The format version written by this build; files of a newer version are
/// refused. 2 added the compression state; version 1 files still load.
inline constexpr std::uint32_t checkpoint_format_version = 2;

/// A view of an optimizer's state: a kind, named buffers in the parameter
/// layout (or, sharded, in this rank's pieces of it), and the step count.
/// Build one with optimizer_state_of().
struct optimizer_state {
  std::string kind = "none";  ///< "adamw", "sgd" or "none"
  std::vector<std::pair<std::string, std::span<float>>> buffers = {};
  std::function<std::int64_t()> get_steps = {};
  std::function<void(std::int64_t)> set_steps = {};
  /// Sharded optimizer state (built over sharded_data_parallel::shard()):
  /// where the buffers' elements sit in the parameters' flat layout, buffer
  /// element k being the k-th element of these pieces concatenated
  /// (sharded_data_parallel::owned()). Empty: the buffers are in the
  /// parameters' layout (numel elements each, or none).
  std::vector<chunk> pieces = {};
};

/// The state of an AdamW (moments "m", "v" and the step count).
optimizer_state optimizer_state_of(ad::adamw& opt);
/// The state of an SGD (the momentum buffer "velocity", empty without momentum).
optimizer_state optimizer_state_of(ad::sgd& opt);
/// The state of an optimizer over this rank's pieces of the parameters:
/// `optimizer_state_of(opt, sdp.owned())` for a sharded_data_parallel. The
/// collective checkpoints gather the pieces into the parameters' layout on
/// save and cut the new rank count's pieces out of it on load, so a
/// checkpoint written at one rank count resumes at another.
optimizer_state optimizer_state_of(ad::adamw& opt, std::vector<chunk> pieces);
optimizer_state optimizer_state_of(ad::sgd& opt, std::vector<chunk> pieces);

/// What a checkpoint holds. Saving reads these; loading writes into them
/// (the parameters and optimizer buffers in place, the sampler through
/// load_state, `step` and `extra` by assignment).
struct training_state {
  ad::parameter_store<float> params = {};
  optimizer_state optimizer = {};    ///< kind "none": no optimizer state saved
  data::sampler* sampler = nullptr;  ///< null: no sampler state saved
  std::int64_t step = 0;             ///< training steps taken
  int world_size = 1;                ///< ranks that wrote it (recorded; see docs/training.md)
  std::map<std::string, std::string> extra = {};  ///< free-form settings (e.g. "global_batch")
  /// The gradient compression of a data_parallel (dp.bucket_compression()):
  /// its per-rank state (error-feedback residuals, int8/top-k counters,
  /// PowerSGD warm starts, auto's choices) is saved, one section per rank,
  /// and restored, so a compressed run resumes bit for bit. null: nothing
  /// saved, and a file's compression state is ignored on load (the
  /// compression then starts afresh: the run continues, not bit for bit).
  compress::bucket_compression* compression = nullptr;
};

/// What load_checkpoint found in the file besides what it restored.
struct checkpoint_info {
  std::uint32_t format_version = 0;
  int world_size = 0;           ///< ranks that wrote it
  data::sampler_state sampler;  ///< as saved (before any conversion)
  bool has_sampler = false;
  int compression_ranks = 0;  ///< ranks whose compression state it holds (0: none)
};

/// Writes `s` to `file` atomically: into a temporary file in the same folder,
/// fsync, rename over `file`, fsync the folder. A failure at any point leaves
/// an existing `file` untouched, removes the temporary and throws
/// checkpoint_error.
///
/// Layout (little-endian): a 32-byte header {magic "RFLOWCKP", u32 format
/// version, u32 header crc32, u64 payload bytes, u32 payload crc32 (zlib),
/// u32 reserved} and the payload (step, world size, sampler state, parameter
/// names and shapes and values, optimizer kind, steps and buffers, extra,
/// and since version 2 the compression state: a flag, the spec and one
/// section per rank). Sharded optimizer state (optimizer_state::pieces) is
/// written in the parameters' layout; one process can do that only when its
/// pieces cover everything (else checkpoint_error: use the collective save).
void save_checkpoint(const std::filesystem::path& file, const training_state& s);

/// Reads and fully validates `file` (magic, version, sizes, checksum, then
/// every parameter name and shape and the optimizer kind and sizes against
/// `s`) before changing anything: on any problem `s` is untouched and
/// checkpoint_error names the file and what is wrong.
checkpoint_info load_checkpoint(const std::filesystem::path& file, training_state& s);

/// Collective save: rank 0 writes the file (all ranks hold the same
/// parameters and optimizer state after data_parallel steps); every rank
/// returns after the file is in place, or throws the same checkpoint_error.
/// A sharded optimizer's pieces (optimizer_state::pieces) are first gathered
/// into the parameters' layout on rank 0: the file is the same as a
/// replicated trainer's with that state, so any rank count (and either
/// trainer) resumes from it. The compression states of all ranks are
/// gathered to rank 0 too.
void save_checkpoint(const communicator& comm, const std::filesystem::path& file,
                     const training_state& s);

/// Collective load: rank 0 reads the file and broadcasts its bytes, every
/// rank validates and restores; if any rank refuses, all throw (no rank goes
/// on with a half-restored state). The files need not be visible to the
/// other ranks. A sharded optimizer takes its pieces (optimizer_state::pieces,
/// those of this run's rank count) out of the saved layout.
checkpoint_info load_checkpoint(const communicator& comm, const std::filesystem::path& file,
                                training_state& s);

}  // namespace ringflow::train
