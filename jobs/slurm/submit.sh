#!/bin/bash
# Submit a sharded teacher job and the merge after it:
#     STUDENT=distill-student-... DATASET=sports jobs/slurm/submit.sh 16
#     FACTORY_JOB="distill teach --dataset sports --template discovered" MODEL=/models/r1 \
#         jobs/slurm/submit.sh 16
# The merge runs after every task has ended (afterany), so finished shards are merged even
# when one failed; re-submit that task (sbatch --array=<id> ...) and merge again.
set -euo pipefail
SHARDS=${1:?usage: submit.sh NUMBER_OF_SHARDS [extra sbatch args]}
shift
HERE=$(cd "$(dirname "$0")" && pwd)
ARRAY=$(sbatch --parsable --export=ALL --array=0-$((SHARDS - 1)) "$@" "$HERE/teacher_array.sbatch")
MERGE=$(sbatch --parsable --export=ALL --dependency=afterany:"$ARRAY" "$HERE/merge.sbatch")
echo "array job $ARRAY ($SHARDS shards), merge job $MERGE"
