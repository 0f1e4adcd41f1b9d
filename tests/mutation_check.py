#!/usr/bin/env python3
"""Deliberately broken builds: each mutation breaks one behaviour a test names, rebuilds what the
test needs and runs it; the test must now fail. Shows that the tests strengthened for issue #15
(and the tie rules) can fail, not only pass. Not part of ctest (one rebuild per mutation);
run by hand from the repository root:

    /usr/bin/python3 tests/mutation_check.py [--build DIR] [--only NAME]

DIR is a configured build folder (default: build). Every file is restored afterwards, also on
Ctrl-C or error; the build folder is then rebuilt from the restored sources.
"""
import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name, file, exact text, its broken replacement, target to rebuild, test command (in DIR).
MUTATIONS = [
    ("l2's default keep_ratio is not 1",
     "include/kvcompress/policies/l2.hpp", "double keep_ratio = 1.0;", "double keep_ratio = 0.99;",
     "kvcompress_tests", ["tests/kvcompress_tests", "--gtest_filter=*L2BoundaryRules/0"]),
    ("a kept slot duplicates its neighbour (per-row/head budget of distinct tokens)",
     "include/kvcompress/scoring.hpp",
     "  return offset == 0 ? chosen : chosen.add_(offset);",
     "  chosen.narrow(-1, 0, 1).copy_(chosen.narrow(-1, 1, 1));\n  return offset == 0 ? chosen : chosen.add_(offset);",
     "kvcompress_tests",
     ["tests/kvcompress_tests", "--gtest_filter=*EveryPolicyKeepsItsBudgetOfDistinctOriginalTokensInEveryRowAndHead/0"]),
    ("ties keep the later position",
     "include/kvcompress/scoring.hpp",
     "  at::Tensor order = std::get<1>(scores.sort(/*stable=*/true, /*dim=*/-1, /*descending=*/largest));",
     "  at::Tensor order = std::get<1>(scores.flip(-1).sort(/*stable=*/true, /*dim=*/-1, /*descending=*/largest));\n"
     "  order = scores.size(-1) - 1 - order;",
     "kvcompress_tests", ["tests/kvcompress_tests", "--gtest_filter=*ExactTiesKeepTheEarlierPositionsInEveryScoringPolicy/0"]),
    ("per-head budgets break cross-head ties by the later head",
     "include/kvcompress/policies/adakv.hpp",
     "  const at::Tensor flat = s.reshape({b, h * seq});",
     "  const at::Tensor flat = s.flip(1).reshape({b, h * seq});",
     "kvcompress_tests", ["tests/kvcompress_tests", "--gtest_filter=*AdaKVBreaksCrossHeadTiesByEarlierHeadThenEarlierSlot/0"]),
    ("compaction leaves accumulated attention behind (half precision, attention-aware policies)",
     "include/kvcompress/cache.hpp",
     "        compact(attention_[at(l)].unsqueeze(-1), len, *s, att_scratch_);",
     "        if (keys_[at(l)].scalar_type() == at::kFloat) compact(attention_[at(l)].unsqueeze(-1), len, *s, att_scratch_);",
     "kvcompress_tests",
     ["tests/kvcompress_tests", "--gtest_filter=*AttentionAwarePoliciesInHalfPrecisionKeepWhatTheirSelectionKeeps/0"]),
    ("the cache rule re-rotates kept keys the wrong way (PPL against the full cache)",
     "include/kvcompress/runtime/positions.hpp",
     "    f[half + j] = static_cast<float>(std::sin(angle));",
     "    f[half + j] = static_cast<float>(-std::sin(angle));",
     "kvbench_tests", ["tests/kvbench_tests", "--gtest_filter=Runtime.CacheRuleKeepsEveryPositionInsideTheLayersSlots"]),
    ("streaming_llm keeps the oldest window instead of the newest (right sizes, wrong tokens: PPL bound)",
     "include/kvcompress/policies/streaming_llm.hpp",
     "keep_span(seq - o.recent_size, o.recent_size);",
     "keep_span(o.start_size, o.recent_size);",
     "kvbench_tests", ["tests/kvbench_tests", "--gtest_filter=StaticRuntime.ChunkedScheduleStaysWithinBudgetPlusSlack"]),
    ("profile_step.py fails after printing its figures (ctest must see the exit status)",
     "examples/python/profile_step.py",
     "if __name__ == \"__main__\":\n    main()",
     "if __name__ == \"__main__\":\n    main()\n    sys.exit(3)",
     None, ["ctest", "-R", "^python_profile_step$", "--output-on-failure"]),
]


def run(cmd, cwd):
    return subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", default="build")
    ap.add_argument("--only", default="", help="run the mutations whose name contains this")
    args = ap.parse_args()
    build = os.path.join(ROOT, args.build)
    if not os.path.isfile(os.path.join(build, "CMakeCache.txt")):
        sys.exit("mutation_check: %s is not a configured build folder" % build)
    failures, touched = [], set()
    try:
        for name, path, old, new, target, test in MUTATIONS:
            if args.only not in name:
                continue
            full = os.path.join(ROOT, path)
            with open(full) as f:
                original = f.read()
            if original.count(old) != 1:
                failures.append(name)
                print("MISSING  %s: the text to break is not (once) in %s" % (name, path))
                continue
            try:
                with open(full, "w") as f:
                    f.write(original.replace(old, new))
                touched.add(target)
                if target:
                    b = run(["cmake", "--build", ".", "-j2", "--target", target], build)
                    if b.returncode != 0:
                        failures.append(name)
                        print("NO BUILD %s\n%s" % (name, b.stdout[-3000:]))
                        continue
                r = run(test, build)
                caught = r.returncode != 0
                print("%s %s  (%s: exit %d)" % ("CAUGHT  " if caught else "MISSED  ", name, " ".join(test), r.returncode))
                if caught:  # what caught it: the first failed assertion
                    lines = r.stdout.splitlines()
                    at = next((i for i, l in enumerate(lines) if "Failure" in l or "FAILED" in l), None)
                    if at is not None:
                        print("           " + "\n           ".join(lines[at:at + 4]))
                if not caught:
                    failures.append(name)
                    print(r.stdout[-2000:])
            finally:
                with open(full, "w") as f:
                    f.write(original)
    finally:
        for target in sorted(t for t in touched if t):
            run(["cmake", "--build", ".", "-j2", "--target", target], build)
    if failures:
        sys.exit("mutation_check: %d mutation(s) not caught: %s" % (len(failures), "; ".join(failures)))
    print("every mutation was caught")


if __name__ == "__main__":
    main()
