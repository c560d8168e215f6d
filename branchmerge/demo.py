"""`make demo`: the toy Branch-Merge pipeline end to end on CPU, through the real entry points.

    toy data -> (shipped strong toy base) -> 3 branches + the mixture baseline -> the TinyR1 merge in
    both orders and Figure 2's methods -> every model evaluated on all three toy domains -> the table

The regime is the paper's: a base that is already a strong reasoner (the shipped strong toy base) and
branches that learn harder problems than it was trained on (the harder toy world, `toy_data_hard`), with
a small learning rate; the branch recipe is the one the regime study (`experiments/toy_regime/`) picked.

Every stage is the command a user would type, run as its own process (two at a time, one thread
each: on 2 cores that is faster than one job with two threads). A finished stage is reused when the
demo runs again. Writes outputs/demo/{table.md,table.csv,table.png,timings.json} and the paired
comparisons between the table's rows on the same items, outputs/demo/{paired.md,paired.csv}.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "outputs"
BRANCHES = ["toy_math_branch", "toy_code_branch", "toy_science_branch"]
TRAIN_JOBS = ["toy_mixture", *BRANCHES]  # the long mixture run first, so the pool stays busy
MERGES = {  # row label -> merge experiment
    "(math & science) & code = TinyR1 order": "toy_merge_tinyr1",
    "(math & code) & science": "toy_merge_tinyr1_alt",
    "math + science: model soup": "toy_merge_soup",
    "math + science: DARE-linear": "toy_merge_dare_linear",
    "math + science: DARE-TIES": "toy_merge_dare_ties",
    "math + science: TIES": "toy_merge_ties",
    "math + science: Arcee Fusion": "toy_merge_arcee",
    "all three: importance fusion (ours)": "toy_merge_importance",
}
DOMAINS = ["toy_math", "toy_code", "toy_science"]
WORLD = "toy_data_hard"  # the branches' toy world (distill experiment) and where it is written
WORLD_DIR = OUT / "toy_world_hard"
BASE_DIR = ROOT / "branchmerge" / "toy" / "assets" / "toy_base_strong"
SUITE = "toy_demo"  # the first 500 test items per domain
BASE = "base (toy R1-Distill stand-in)"  # the row labels of stage 4's models, as the paired table names them
EXPERTS = {"toy_math": "math expert", "toy_code": "code expert", "toy_science": "science expert"}
MIXTURE = "data mixture SFT"
FIG2_REFS = ["math + science: TIES", "math + science: Arcee Fusion"]


def run(args: list[str], log_name: str) -> float:
    """Run `python <args>` from the repo root with one CPU thread; its output goes to a log file."""
    env = {
        **os.environ,
        "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    log = OUT / "demo" / "logs" / f"{log_name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"demo stage failed: python {' '.join(args)}\n--- {log} ---\n{tail}")
    return time.time() - t0


def parallel(jobs: dict[str, list[str]], workers: int = 2) -> dict[str, float]:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {name: pool.submit(run, args, name) for name, args in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


def _trained(experiment: str) -> bool:
    """A finished run of this experiment's current recipe exists (a stale one is moved aside)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from branchmerge.config import validate
    from branchmerge.config.schema import TrainConfig
    from branchmerge.train.run import training_signature

    run = OUT / "train" / experiment
    done = run / "export" / "branchmerge.json"
    if not done.exists():
        return False
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose(
            "train", [f"+experiment={experiment}", f"paths.run_dir={run}", f"paths.root_dir={ROOT}"]
        )
    now = training_signature(OmegaConf.to_container(validate(cfg, TrainConfig)))
    if training_signature(json.loads(done.read_text())["config"]) == now:
        return True
    stale = run.with_name(f"{run.name}.stale-{int(time.time())}")
    run.rename(stale)
    say(f"    {experiment}: the recipe changed since {run} was trained; moved it to {stale.name}")
    return False


def _fresh(results: Path, model: Path) -> bool:
    """A result file counts only if it scored exactly these weights (a retrained model is re-scored)."""
    from branchmerge.eval.harness import model_hash

    return results.exists() and json.loads(results.read_text())["model"]["hash"] == model_hash(model)


def say(msg: str) -> None:
    print(msg, flush=True)


def main() -> None:
    t_all = time.time()
    timings: dict[str, float] = {}
    say(f"=== 1/4 toy world: python distill.py +experiment={WORLD}")
    timings[WORLD] = run(["distill.py", f"+experiment={WORLD}"], WORLD)

    say("=== 2/4 branches and the mixture: python train.py +experiment=<name>  (2 at a time, 1 thread each)")
    todo = {
        j: ["train.py", f"+experiment={j}", "trainer.threads=1", "trainer.progress_bar=false"]
        for j in TRAIN_JOBS
        if not _trained(j)
    }
    timings.update(parallel(todo))
    train_cost = {
        j: json.loads((OUT / "train" / j / "export" / "branchmerge.json").read_text())["train_seconds"]
        for j in TRAIN_JOBS
    }

    say("=== 3/4 merges: python merge.py +experiment=<recipe>  (2 at a time)")
    timings.update(
        parallel(
            {exp: ["merge.py", f"+experiment={exp}", "options.progress=false"] for exp in MERGES.values()}
        )
    )
    merge_cost = {}
    for label, exp in MERGES.items():
        prov = json.loads((OUT / "merge" / exp / "model" / "merge_provenance.json").read_text())
        merge_cost[label] = prov["seconds"]

    say(f"=== 4/4 evaluation on all three toy domains: python evaluate.py model_path=<model> eval={SUITE}")
    models = {
        BASE: BASE_DIR,
        "math expert": OUT / "train" / "toy_math_branch" / "export",
        "code expert": OUT / "train" / "toy_code_branch" / "export",
        "science expert": OUT / "train" / "toy_science_branch" / "export",
        "data mixture SFT": OUT / "train" / "toy_mixture" / "export",
        **{label: OUT / "merge" / exp / "model" for label, exp in MERGES.items()},
    }
    jobs, result_files = {}, {}
    for label, path in models.items():
        tag = path.parent.name if path.name in ("export", "model") else path.name
        result_files[label] = OUT / "eval" / f"{tag}_{SUITE}" / "results.json"
        if not _fresh(result_files[label], path):
            jobs[f"eval_{tag}"] = [
                "evaluate.py",
                f"model_path={path}",
                f"eval={SUITE}",
                f"paths.toy_dir={WORLD_DIR}",
                f"paths.toy_world={WORLD}",
                "threads=1",
            ]
    timings.update(parallel(jobs))

    from branchmerge.report.toy_table import write_toy_table

    cost = {
        "math expert": train_cost["toy_math_branch"],
        "code expert": train_cost["toy_code_branch"],
        "science expert": train_cost["toy_science_branch"],
        "data mixture SFT": train_cost["toy_mixture"],
        **merge_cost,
    }
    table = write_toy_table(result_files, cost, OUT / "demo")
    fig2 = write_fig2(result_files, OUT / "demo" / "fig2_merge_methods.png")
    paired = write_paired(result_files, OUT / "demo")
    timings["total"] = time.time() - t_all
    (OUT / "demo" / "timings.json").write_text(json.dumps(timings, indent=2))
    say("\n" + table)
    say(paired)
    say(
        f"demo finished in {timings['total']:.0f}s; table.md/.csv/.png, paired.md/.csv, {fig2.name} and "
        f"timings.json in {OUT / 'demo'}"
    )


def write_fig2(result_files: dict[str, Path], path: Path) -> Path:
    """Figure 2 in miniature: the math + science merges beside the two experts, on every domain."""
    from branchmerge.report.sweep_plots import plot_methods
    from branchmerge.report.toy_table import DOMAINS, scores_of

    rows = ["math expert", "science expert", *(k for k in MERGES if k.startswith("math + science"))]
    scores = {
        label.removeprefix("math + science: "): {
            name: scores_of(result_files[label])[d] for d, name in DOMAINS
        }
        for label in rows
    }
    return plot_methods(
        scores, path, "Merge methods on the toy math + science experts (cf. the paper's Figure 2)"
    )


def write_paired(result_files: dict[str, Path], out_dir: Path) -> str:
    """paired.md/.csv: merges vs base, experts and mixture; Figure 2's methods vs TIES and Arcee Fusion."""
    from branchmerge.report.toy_table import write_paired_table

    return write_paired_table(
        result_files,
        out_dir,
        base=BASE,
        experts=EXPERTS,
        mixture=MIXTURE,
        merges=list(MERGES),
        fig2=[k for k in MERGES if k.startswith("math + science")],
        fig2_refs=FIG2_REFS,
        headline="(math & science) & code = TinyR1 order",
    )


if __name__ == "__main__":
    main()
