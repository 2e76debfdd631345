#!/usr/bin/env bash
# Run a command (default: `make test`) while every core is kept busy by a background loop, as on a
# machine shared with other jobs (docs/testing.md). The loops are stopped when the command ends,
# however it ends (exit, failure, Ctrl-C). TETHER_LOAD_PROCS sets the number of loops (default: nproc).
set -u
n=${TETHER_LOAD_PROCS:-$(nproc)}
pids=()
stop_load() {
    if [ ${#pids[@]} -gt 0 ]; then
        kill "${pids[@]}" 2>/dev/null
        wait "${pids[@]}" 2>/dev/null
    fi
}
trap stop_load EXIT
trap 'exit 130' INT TERM
for _ in $(seq "$n"); do
    yes > /dev/null &
    pids+=($!)
done
[ $# -eq 0 ] && set -- make test
start=$(date +%s)
"$@"
rc=$?
echo "test_under_load: '$*' with $n busy loops: exit $rc after $(( $(date +%s) - start )) s" >&2
exit $rc
