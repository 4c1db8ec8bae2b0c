#!/bin/bash
# Wall time of one training run under each launcher, side by side, RUNS times:
#   llmtune launch RECIPE --nproc 2           (torchrun)
#   llmtune launch RECIPE --engine ray --workers 2   (Ray Train, a local instance per run)
# Usage: scripts/bench_launchers.sh RECIPE [RUNS]   (the recipe prepared; each run trains with --force)
set -u
recipe=${1:?usage: scripts/bench_launchers.sh RECIPE [RUNS]}
runs=${2:-3}
python=${PYTHON:-python}
for i in $(seq "$runs"); do
    for engine in torchrun ray; do
        args=(--nproc 2)
        [ "$engine" = ray ] && args=(--engine ray --workers 2)
        start=$(date +%s.%N)
        "$python" -m llmtune launch "$recipe" "${args[@]}" --force >/dev/null 2>&1
        code=$?
        echo "$engine run $i exit $code $(echo "$(date +%s.%N) - $start" | bc) s"
    done
done
