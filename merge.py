"""Merge branch checkpoints with a streaming, memory-bounded engine.

python merge.py +experiment=toy_merge_tinyr1                   # the released TinyR1 order, toy branches
python merge.py +experiment=tinyr1_merge                       # the same over the 32B branches
python merge.py method=linear 'inputs=[A,B]' output_dir=OUT    # one step from the command line
python merge.py from_mergekit=config.yml output_dir=OUT        # a mergekit YAML
python merge.py +experiment=toy_merge_arcee eval=toy           # merge, score, return the objective
python merge.py -m +experiment=toy_merge_ties +hparams_search=toy_ties_grid   # a sweep (conf/hparams_search/)
"""

import hydra
from omegaconf import DictConfig

import branchmerge.config.resolvers  # noqa: F401  (${bm_cwd:} in conf/paths/, conf/hparams_search/)
from branchmerge.errors import reported


@hydra.main(version_base="1.3", config_path="conf", config_name="merge")
def main(cfg: DictConfig) -> float | list[float] | dict:
    with reported():  # a BranchmergeError: one line on stderr, exit status 1
        if cfg.get("eval") is None:  # a merge: the merge stage alone
            from branchmerge.merge.run import run

            return run(cfg)
        from branchmerge.sweep.trial import run_trial  # a scored merge (a sweep trial)

        return run_trial(cfg)


if __name__ == "__main__":
    main()
