#!/usr/bin/env bash
# Table 2 at the paper's scale (needs the three branches of ../tinyr1_table1/run.sh). Hardware: README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
python train.py +experiment=mixture
python merge.py +experiment=tinyr1_merge
python merge.py +experiment=tinyr1_merge_alt
EVAL="eval=paper backend=vllm tensor_parallel_size=8 dtype=bfloat16"
for m in train/math_branch/export train/code_branch/export train/science_branch/export train/mixture/export \
         merge/tinyr1_merge/model merge/tinyr1_merge_alt/model; do
  python evaluate.py model_path=outputs/$m $EVAL
done
python -m branchmerge.report table2 \
  --result "math expert=outputs/eval/math_branch_paper/results.json" \
  --result "code expert=outputs/eval/code_branch_paper/results.json" \
  --result "science expert=outputs/eval/science_branch_paper/results.json" \
  --result "data mixture SFT=outputs/eval/mixture_paper/results.json" \
  --result "(math & code) & science=outputs/eval/tinyr1_merge_alt_paper/results.json" \
  --result "(math & science) & code = TinyR1-32B-Preview=outputs/eval/tinyr1_merge_paper/results.json" \
  --out experiments/tinyr1_table2/out
