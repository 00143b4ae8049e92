#!/usr/bin/env bash
# Builds the GPU test and benchmark binaries HERE (CUDA toolkit, no GPU) and
# copies them into gpu-prebuilt/ (git-ignored), for scripts/gpu_check.sh on a
# lent GPU machine (`PREBUILT=gpu-prebuilt`, carried with the call). A short
# device lease then spends its minutes on tests, not on compiling. The
# binaries link ringflow statically; they load OpenMPI's libmpi.so.40, fmt 9,
# the CUDA runtime (libcudart.so.13) and NCCL 2 there, which the GPU machines
# have (gpu_check.sh puts the toolkit's lib directories on LD_LIBRARY_PATH).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BUILD_DIR=${BUILD_DIR:-build-gpu-pre}
launcher=()
command -v ccache >/dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release -DRINGFLOW_WITH_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
  -DRINGFLOW_BUILD_TESTS=ON "${launcher[@]}" >/dev/null
targets=(test_cuda test_cuda_mpi)
if grep -qs "gpu-kernel-bench" bench/gpu/CMakeLists.txt; then
  targets+=(gpu-kernel-bench ringflow_gpu_bench)
fi
grep -qs "gpu-staged-bench" bench/gpu/CMakeLists.txt && targets+=(gpu-staged-bench)
cmake --build "$BUILD_DIR" -j "${JOBS:-2}" --target "${targets[@]}"
rm -rf gpu-prebuilt
mkdir -p gpu-prebuilt/tests gpu-prebuilt/bin gpu-prebuilt/lib
cp "$BUILD_DIR"/tests/test_cuda "$BUILD_DIR"/tests/test_cuda_mpi gpu-prebuilt/tests/
[[ -x $BUILD_DIR/bin/gpu-kernel-bench ]] && cp "$BUILD_DIR"/bin/gpu-kernel-bench gpu-prebuilt/bin/
[[ -x $BUILD_DIR/bin/gpu-staged-bench ]] && cp "$BUILD_DIR"/bin/gpu-staged-bench gpu-prebuilt/bin/
cp "$BUILD_DIR"/lib/libringflow_gpu_bench.so* gpu-prebuilt/lib/ 2>/dev/null || true
strip gpu-prebuilt/tests/* gpu-prebuilt/bin/* 2>/dev/null || true
# nlohmann_json (header-only, private to the library) for a native build
# there: the GPU machines' image lacks the package; CMake looks here.
mkdir -p gpu-prebuilt/include && cp -r /usr/include/nlohmann gpu-prebuilt/include/
du -sh gpu-prebuilt
ldd gpu-prebuilt/tests/test_cuda_mpi | grep -v "linux-vdso\|ld-linux"
