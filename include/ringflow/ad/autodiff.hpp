// Everything in ringflow::ad: tensors, ops, layers, parameter store, optimizers, schedules.
#pragma once

#include "ringflow/ad/cnn.hpp"
#include "ringflow/ad/custom_op.hpp"
#include "ringflow/ad/embedding.hpp"
#include "ringflow/ad/gemm.hpp"
#include "ringflow/ad/init.hpp"
#include "ringflow/ad/layers.hpp"
#include "ringflow/ad/ops.hpp"
#include "ringflow/ad/optim.hpp"
#include "ringflow/ad/parameter_store.hpp"
#include "ringflow/ad/schedule.hpp"
#include "ringflow/ad/shape.hpp"
#include "ringflow/ad/sparse_grad.hpp"
#include "ringflow/ad/tensor.hpp"
