#!/usr/bin/env bash
# Figure 2 at the paper's scale: merge methods on the 32B math + science experts, scored on the paper's
# suite (the paper reports GPQA-Diamond only; we score all three). Needs the branches of
# ../tinyr1_table1/run.sh and the base student under paths.model_dir. Hardware: README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
EVAL="eval=paper backend=vllm tensor_parallel_size=8 dtype=bfloat16"
for m in soup dare_linear dare_ties ties arcee; do
  python merge.py +experiment=fig2_$m
  python evaluate.py model_path=outputs/merge/fig2_$m/model $EVAL
done
for b in math_branch science_branch; do python evaluate.py model_path=outputs/train/$b/export $EVAL; done
python experiments/tinyr1_fig2_merge_methods/aggregate.py
