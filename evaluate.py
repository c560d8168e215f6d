"""Evaluate a checkpoint the way the paper did, through lm-evaluation-harness with our task YAMLs.

python evaluate.py model_path=outputs/train/toy_math_branch/export eval=toy        # CPU, HF backend
python evaluate.py model_path=<32B folder> eval=paper backend=vllm tensor_parallel_size=8
"""

import hydra
from omegaconf import DictConfig

import branchmerge.config.resolvers  # noqa: F401  (${bm_cwd:} in conf/paths/, ${bm_model_tag:...})
from branchmerge.errors import reported


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> float:
    from branchmerge.eval.harness import evaluate
    from branchmerge.toy.build import ensure_world

    with reported():  # a BranchmergeError: one line on stderr, exit status 1
        ensure_world(cfg)  # a toy run builds the toy world first when it is missing
        results = evaluate(cfg)
    scores = [t["pass@1"] for t in results["tasks"].values()]
    return sum(scores) / len(scores)


if __name__ == "__main__":
    main()
