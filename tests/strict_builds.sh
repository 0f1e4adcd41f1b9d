#!/bin/bash
# The stricter builds README's test command runs after the test suite (and CI with it):
#  1. AddressSanitizer + UndefinedBehaviorSanitizer (g++, -O1): the spec fuzzer on
#     $KVC_FUZZ_INPUTS inputs (default 100,000) and the GoogleTest suites; any report stops
#     the run with a non-zero status (halt_on_error, -fno-sanitize-recover).
#  2. clang++: the library, kvbench, the tests and the benchmarks, then the unit suite and a
#     short fuzzer run.
# Build folders: build-sanitize/ and build-clang/ next to build/. JOBS (default 2) parallel jobs.
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=${JOBS:-2}
inputs=${KVC_FUZZ_INPUTS:-100000}
start=$SECONDS

echo "== AddressSanitizer + UndefinedBehaviorSanitizer"
san="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -O1"
cmake -S . -B build-sanitize -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS="$san" \
      -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined" -DKVCOMPRESS_BUILD_BENCHMARKS=OFF > /dev/null
cmake --build build-sanitize -j"$jobs" --target kvcompress_fuzz kvcompress_tests kvbench_tests
export ASAN_OPTIONS=halt_on_error=1:abort_on_error=0:detect_leaks=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
# LibTorch (not instrumented) allocates process-lifetime registries it never frees.
export LSAN_OPTIONS=suppressions=$PWD/tests/lsan_libtorch.supp:print_suppressions=0
./build-sanitize/tests/kvcompress_fuzz --inputs "$inputs" --seed 1
./build-sanitize/tests/kvcompress_tests --gtest_brief=1
./build-sanitize/tests/kvbench_tests --gtest_brief=1
echo "sanitizers: clean ($((SECONDS - start)) s so far)"

echo "== clang++"
cmake -S . -B build-clang -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=Release > /dev/null
cmake --build build-clang -j"$jobs"
./build-clang/tests/kvcompress_tests --gtest_brief=1
./build-clang/tests/kvcompress_fuzz --inputs 10000 --seed 2
echo "strict builds: all clean in $((SECONDS - start)) s"
