#!/bin/sh
# Runs each fuzz target for SECONDS: new inputs go to .build-fuzz/corpus/T
# (kept between runs), seeds come from Fuzz/corpus/T, crashes to
# .build-fuzz/crashes/. Prints executions per target; exits 1 if any target
# found a crash, a leak or a broken invariant.
#   sh Fuzz/run.sh SECONDS TARGET...     (FUZZ_RUNS=N: stop after N executions instead;
#                                          FUZZ_ARGS: more libFuzzer flags, e.g. -max_len=1024)
set -u
seconds=$1; shift
cd "$(dirname "$0")/.."
mkdir -p .build-fuzz/crashes
status=0
printf '%-16s %12s %10s %8s  %s\n' target executions exec/s cov result
for t in "$@"; do
  mkdir -p ".build-fuzz/corpus/$t"
  log=".build-fuzz/$t.log"
  limit="-max_total_time=$seconds"
  [ -n "${FUZZ_RUNS:-}" ] && limit="-runs=$FUZZ_RUNS"
  SWIFT_BACKTRACE=enable=no ".build-fuzz/release/fuzz-$t" "$limit" ${FUZZ_ARGS:-} -print_final_stats=1 \
    -artifact_prefix=".build-fuzz/crashes/$t-" -rss_limit_mb=4096 ".build-fuzz/corpus/$t" "Fuzz/corpus/$t" > "$log" 2>&1
  rc=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
  if [ $rc -eq 0 ]; then result=ok; else result="FAILED (see $log)"; status=1; fi
  printf '%-16s %12s %10s %8s  %s\n' "$t" "${runs:-?}" "${rate:-?}" "${cov:-?}" "$result"
  [ $rc -eq 0 ] || grep -E "fuzz invariant|ERROR:|SUMMARY" "$log" | head -5
done
exit $status
