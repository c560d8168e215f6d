#!/usr/bin/env bash
# Table 1 at the paper's scale. Hardware: see README.md. Each line resumes / reuses finished work.
set -euo pipefail
cd "$(dirname "$0")/../.."
python distill.py +experiment=math_data
python distill.py +experiment=code_data
python distill.py +experiment=science_data teacher.base_url="${TEACHER_URL:?set TEACHER_URL to an OpenAI-compatible R1 endpoint}"
# one branch per domain; on SLURM add `-m hydra/launcher=slurm`, with torchrun see the README
python train.py +experiment=math_branch
python train.py +experiment=code_branch
python train.py +experiment=science_branch
python merge.py +experiment=tinyr1_merge
python evaluate.py model_path=outputs/merge/tinyr1_merge/model eval=paper backend=vllm tensor_parallel_size=8 dtype=bfloat16
python -m branchmerge.report table1 \
  --result "TinyR1-32B-Preview=outputs/eval/tinyr1_merge_paper/results.json" \
  --out experiments/tinyr1_table1/out
