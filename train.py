"""Branch SFT: fine-tune one copy of the student per domain on its teacher traces.

python train.py +experiment=toy_math_branch                       # one toy branch, CPU
python train.py -m +experiment=toy_math_branch,toy_code_branch,toy_science_branch
python train.py +experiment=math_branch                           # the paper's math branch (32B, GPUs)
"""

import hydra
from omegaconf import DictConfig

import branchmerge.config.resolvers  # noqa: F401  (${bm_cwd:} in conf/paths/)
from branchmerge.errors import reported


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from branchmerge.toy.build import ensure_world
    from branchmerge.train.run import train

    with reported():  # a BranchmergeError: one line on stderr, exit status 1
        ensure_world(cfg)  # a toy run builds the toy world first when it is missing
        return train(cfg)


if __name__ == "__main__":
    main()
