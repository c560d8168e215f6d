"""Selective distillation: teacher traces per domain -> verified, filtered datasets in the record schema.

python distill.py +experiment=toy_data        # the toy world (datasets + tokenizer), CPU, ~1 min
python distill.py +experiment=toy_distill     # the selection pipeline on the toy world, CPU, ~10 s
python distill.py +experiment=math_data       # the paper's branch datasets (also code_data, science_data)
"""

import hydra
from omegaconf import DictConfig

import branchmerge.config.resolvers  # noqa: F401  (${bm_cwd:} in conf/paths/)
from branchmerge.errors import reported


@hydra.main(version_base="1.3", config_path="conf", config_name="distill")
def main(cfg: DictConfig) -> None:
    from branchmerge.distill.pipeline import run
    from branchmerge.toy.build import build_toy, ensure_world

    with reported():  # a BranchmergeError: one line on stderr, exit status 1
        ensure_world(cfg)  # a toy run builds the toy world first when it is missing
        run(cfg, build_toy=build_toy)


if __name__ == "__main__":
    main()
