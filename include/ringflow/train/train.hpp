// Everything in ringflow::train: the data-parallel trainer, checkpoints and the timeline.
#pragma once

#include "ringflow/train/checkpoint.hpp"
#include "ringflow/train/data_parallel.hpp"
#include "ringflow/train/memory.hpp"
#include "ringflow/train/sharded_data_parallel.hpp"
#include "ringflow/train/timeline.hpp"
