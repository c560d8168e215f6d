"""Merge branch checkpoints with a streaming, memory-bounded engine.

python merge.py +experiment=toy_merge_tinyr1                   # the released TinyR1 order, toy branches
python merge.py +experiment=tinyr1_merge                       # the same over the 32B branches
python merge.py method=linear 'inputs=[A,B]' output_dir=OUT    # one step from the command line
python merge.py from_mergekit=config.yml output_dir=OUT        # a mergekit YAML
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="merge")
def main(cfg: DictConfig) -> dict:
    from branchmerge.merge.run import run

    return run(cfg)


if __name__ == "__main__":
    main()
