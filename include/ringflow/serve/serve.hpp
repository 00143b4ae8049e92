// ringflow::serve in one include: inference models, quantization, pruning,
// distillation, the model file, the int8 products and the batched runner.
#pragma once

#include "ringflow/serve/distill.hpp"
#include "ringflow/serve/int8_gemm.hpp"
#include "ringflow/serve/model.hpp"
#include "ringflow/serve/model_file.hpp"
#include "ringflow/serve/prune.hpp"
#include "ringflow/serve/runner.hpp"
