// Checkpoints: parameters, optimizer state, sampler state and step in one atomically written, checksummed file.
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
#include "ringflow/comm/communicator.hpp"
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

/// The format version written by this build; files of a newer version are refused.
inline constexpr std::uint32_t checkpoint_format_version = 1;

/// A view of an optimizer's state: a kind, named buffers in the parameter
/// layout, and the step count. Build one with optimizer_state_of().
struct optimizer_state {
  std::string kind = "none";  ///< "adamw", "sgd" or "none"
  std::vector<std::pair<std::string, std::span<float>>> buffers = {};
  std::function<std::int64_t()> get_steps = {};
  std::function<void(std::int64_t)> set_steps = {};
};

/// The state of an AdamW (moments "m", "v" and the step count).
optimizer_state optimizer_state_of(ad::adamw& opt);
/// The state of an SGD (the momentum buffer "velocity", empty without momentum).
optimizer_state optimizer_state_of(ad::sgd& opt);

/// What a checkpoint holds. Saving reads these; loading writes into them
/// (the parameters and optimizer buffers in place, the sampler through
/// load_state, `step` and `extra` by assignment).
struct training_state {
  ad::parameter_store<float> params = {};
  optimizer_state optimizer = {};     ///< kind "none": no optimizer state saved
  data::sampler* sampler = nullptr;   ///< null: no sampler state saved
  std::int64_t step = 0;              ///< training steps taken
  int world_size = 1;                 ///< ranks that wrote it (recorded; see docs/training.md)
  std::map<std::string, std::string> extra = {};  ///< free-form settings (e.g. "global_batch")
};

/// What load_checkpoint found in the file besides what it restored.
struct checkpoint_info {
  std::uint32_t format_version = 0;
  int world_size = 0;              ///< ranks that wrote it
  data::sampler_state sampler;     ///< as saved (before any conversion)
  bool has_sampler = false;
};

/// Writes `s` to `file` atomically: into a temporary file in the same folder,
/// fsync, rename over `file`, fsync the folder. A failure at any point leaves
/// an existing `file` untouched, removes the temporary and throws
/// checkpoint_error.
///
/// Layout (little-endian): a 32-byte header {magic "RFLOWCKP", u32 format
/// version, u32 header crc32, u64 payload bytes, u32 payload crc32 (zlib),
/// u32 reserved} and the payload (step, world size, sampler state, parameter
/// names and shapes and values, optimizer kind, steps and buffers, extra).
void save_checkpoint(const std::filesystem::path& file, const training_state& s);

/// Reads and fully validates `file` (magic, version, sizes, checksum, then
/// every parameter name and shape and the optimizer kind and sizes against
/// `s`) before changing anything: on any problem `s` is untouched and
/// checkpoint_error names the file and what is wrong.
checkpoint_info load_checkpoint(const std::filesystem::path& file, training_state& s);

/// Collective save: rank 0 writes the file (all ranks hold the same
/// parameters and optimizer state after data_parallel steps); every rank
/// returns after the file is in place, or throws the same checkpoint_error.
void save_checkpoint(const communicator& comm, const std::filesystem::path& file,
                     const training_state& s);

/// Collective load: rank 0 reads the file and broadcasts its bytes, every
/// rank validates and restores; if any rank refuses, all throw (no rank goes
/// on with a half-restored state). The files need not be visible to the
/// other ranks.
checkpoint_info load_checkpoint(const communicator& comm, const std::filesystem::path& file,
                                training_state& s);

}  // namespace ringflow::train
