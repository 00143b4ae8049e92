// Consumer of an installed ringflow: 4 thread ranks allreduce and check the result.
#include <cstdio>
#include <span>
#include <vector>

#include <ringflow/cuda/device.hpp>
#include <ringflow/ringflow.hpp>
#include <ringflow/serve/model.hpp>

int main() {
  constexpr int ranks = 4;
  constexpr int n = 1000;
  int wrong = 0;
  try {
    ringflow::local::run(ranks, [&](ringflow::communicator& c) {
      std::vector<float> x(n);
      for (int i = 0; i < n; ++i) x[i] = static_cast<float>(c.rank() + i);
      ringflow::allreduce(c, std::span(x), ringflow::sum);
      // sum over r of (r + i) = 0+1+2+3 + 4i
      int bad = 0;
      for (int i = 0; i < n; ++i) {
        if (x[i] != static_cast<float>(6 + ranks * i)) ++bad;
      }
      std::vector<int> count{bad};
      ringflow::allreduce(c, std::span(count), ringflow::sum);
      if (c.rank() == 0) wrong = count[0];
    });
  } catch (const ringflow::error& e) {
    std::fprintf(stderr, "ringflow consumer: error: %s\n", e.what());
    return 1;
  }
  if (RINGFLOW_CONSUMER_EXPECT_CUDA && !ringflow::cuda::compiled_with_cuda()) {
    std::fprintf(stderr, "ringflow consumer: ringflow::cuda should have been built with nvcc\n");
    return 1;
  }
  if (wrong != 0) {
    std::fprintf(stderr, "ringflow consumer: %d wrong elements\n", wrong);
    return 1;
  }
  // ringflow::serve links too: y = 2 x0 + 3 x1 + 1.
  const ringflow::serve::model m(std::vector<ringflow::serve::dense_layer>{
      {.in = 2, .out = 1, .weight = {2.0f, 3.0f}, .bias = {1.0f}}});
  if (m.forward(std::vector<float>{1.0f, 1.0f}, 1)[0] != 6.0f) {
    std::fprintf(stderr, "ringflow consumer: the serve model computed a wrong value\n");
    return 1;
  }
  std::printf("ringflow consumer: OK (%d ranks, %d floats, cuda compiled=%d, gpus=%d)\n", ranks, n,
              ringflow::cuda::compiled_with_cuda() ? 1 : 0, ringflow::cuda::device_count());
  return 0;
}
