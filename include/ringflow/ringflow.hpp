// Umbrella header: everything a trainer needs from ringflow's lower layers.
#pragma once

#include "ringflow/backends/local.hpp"
#include "ringflow/backends/mpi.hpp"
#include "ringflow/coll/async.hpp"
#include "ringflow/coll/collectives.hpp"
#include "ringflow/coll/explain.hpp"
#include "ringflow/coll/sparse.hpp"
#include "ringflow/comm/communicator.hpp"
#include "ringflow/comm/flight.hpp"
#include "ringflow/core/dtype.hpp"
#include "ringflow/core/error.hpp"
#include "ringflow/core/half.hpp"
#include "ringflow/core/log.hpp"
#include "ringflow/core/reduce_op.hpp"
