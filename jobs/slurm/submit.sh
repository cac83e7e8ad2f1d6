#!/bin/bash
# Submit a sharded teacher job and the merge after it:
#     STUDENT=distill-student-... DATASET=sports jobs/slurm/submit.sh 16
#     FACTORY_JOB="distill teach --dataset sports --template discovered" MODEL=/models/r1 \
#         jobs/slurm/submit.sh 16
# The merge runs after every task has ended (afterany), so finished shards are merged even
# when one failed; re-submit that task with the job's shard count and merge again:
#     SHARDS=16 sbatch --array=<id> jobs/slurm/teacher_array.sbatch
#     sbatch jobs/slurm/merge.sbatch
set -euo pipefail
SHARDS=${1:?usage: submit.sh NUMBER_OF_SHARDS [extra sbatch args]}
[[ $SHARDS =~ ^[1-9][0-9]*$ ]] || { echo "submit.sh: '$SHARDS' is not a number of shards" >&2; exit 2; }
shift
# The tasks take the shard count from SHARDS, never from Slurm's array variables (a task
# re-submitted alone sees an array of one); --export=ALL hands it to them and to the merge.
export SHARDS
HERE=$(cd "$(dirname "$0")" && pwd)
ARRAY=$(sbatch --parsable --export=ALL --array=0-$((SHARDS - 1)) "$@" "$HERE/teacher_array.sbatch")
MERGE=$(sbatch --parsable --export=ALL --dependency=afterany:"$ARRAY" "$HERE/merge.sbatch")
echo "array job $ARRAY ($SHARDS shards), merge job $MERGE"
