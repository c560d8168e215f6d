"""The toy regime study: when does Branch-Merge keep the experts' gains? A resumable runner.

    python experiments/toy_regime/run.py --out outputs/toy_regime --toy-dir outputs/toy_world_strong \
        --base strong=branchmerge/toy/assets/toy_base_strong --base weak=branchmerge/toy/assets/toy_base \
        --suite toy_val --budget 60                   # minutes; 2 one-thread processes at a time
    python experiments/toy_regime/analyze.py --out outputs/toy_regime

Grid: base x lr x seed "groups", each ONE run per domain of max(--steps) steps exported at every step
count (constant lr after --warmup-steps, so a checkpoint equals a shorter run: jobs.py), giving the
cells (base, lr, steps, seed): 3 experts, the tinyr1 / linear / ties merges (same knobs everywhere),
all scored on --limit val items per domain (experts on their own domain). Order: bases as given (a
base whose folder does not exist yet is waited for), lrs as given, first seed; once a base's
first-seed groups are scored, the criterion (README.md) picks a setting and its lr gets the extra
seeds (the picked step count and its neighbours) and the mixture (3 x steps). `--budget` admits
groups, in that order, while their estimated cost fits; a started group always finishes. Finished
jobs (a done.json beside their output) are reused; `<out>/study.log` records every job.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `python experiments/toy_regime/run.py` from a checkout
    sys.path.insert(0, str(ROOT))

from experiments.toy_regime import analyze, jobs  # noqa: E402
from experiments.toy_regime.grid import (  # noqa: E402
    DOMAINS,
    METHODS,
    MIXTURE_FACTOR,
    Group,
    Job,
    Layout,
    base_job,
    group_jobs,
    job_cost,
)

SIGNED = (
    "steps",
    "warmup_steps",
    "methods",
    "expert_domains",
    "suite",
    "limit",
    "val_as_test",
    "toy_dir",
    "train_override",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "toy_regime")
    p.add_argument(
        "--base",
        action="append",
        default=[],
        metavar="LABEL=PATH",
        help="an HF folder to branch from, in priority order (repeatable)",
    )
    p.add_argument("--lrs", default="3e-4,1e-3,1e-4", help="peak lrs, in priority order")
    p.add_argument("--steps", default="20,40,80", help="branch step counts (one run: the largest)")
    p.add_argument("--seeds", type=int, default=3, help="seeds for the picked setting's lr")
    p.add_argument(
        "--seed-bases",
        default=None,
        help="labels whose picked lr gets the extra seeds (default: the first --base)",
    )
    p.add_argument("--first-seeds", type=int, default=1, help="seeds for every lr")
    p.add_argument("--warmup-steps", type=int, default=4)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument(
        "--mixture",
        choices=["picked", "all", "none"],
        default="picked",
        help="the mixture (3 x steps) for the picked lr's first seed, every group, or none",
    )
    p.add_argument("--expert-domains", choices=["own", "all"], default="own")
    p.add_argument("--suite", default="toy_val", help="conf/eval/<suite>.yaml")
    p.add_argument("--limit", type=int, default=300, help="items per domain")
    p.add_argument(
        "--val-as-test",
        action="store_true",
        help="score the toy world's val split through a suite that reads test.jsonl (a view "
        "<out>/toy_world_val whose test.jsonl are links to val.jsonl)",
    )
    p.add_argument("--toy-dir", type=Path, default=ROOT / "outputs" / "toy_world")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--budget", type=float, default=60.0, help="minutes of wall time for this invocation")
    p.add_argument("--train-override", action="append", default=[], help="extra train.py override")
    p.add_argument("--keep-checkpoints", action="store_true")
    p.add_argument("--no-wait", action="store_true", help="stop instead of waiting for a missing base")
    p.add_argument("--plan-only", action="store_true", help="print the admitted groups and estimates")
    a = p.parse_args(argv)
    a.lrs = [float(x) for x in a.lrs.split(",")]
    a.steps = tuple(sorted(int(x) for x in a.steps.split(",")))
    a.methods = tuple(a.methods.split(","))
    bad = [m for m in a.methods if m not in METHODS]
    if bad:
        p.error(f"--methods {bad}: choose from {METHODS}")
    bases = {}
    for spec in a.base or [f"weak={ROOT / 'branchmerge/toy/assets/toy_base'}"]:
        label, sep, path = spec.partition("=")
        if not sep or not label or "/" in label:
            p.error(f"--base {spec!r}: write LABEL=PATH (a label without '/')")
        bases[label] = Path(path).resolve()
    a.bases = bases
    a.seed_bases = a.seed_bases.split(",") if a.seed_bases else list(bases)[:1]
    return a


class Study:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a, self.out = a, a.out.resolve()
        self.lay = Layout(self.out, a.steps)
        self.deadline = time.time() + 60 * a.budget
        self.running: dict[str, Future] = {}
        self.failed: set[str] = set()
        self.started = 0
        self.eval_toy_dir = self._val_view() if a.val_as_test else a.toy_dir.resolve()
        self.picks: dict[str, float | None] = {}
        jobs.suite_tasks(a.suite, list(DOMAINS), a.limit)  # a missing suite or task: an error now

    # ---- bookkeeping ---------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        with (self.out / "study.log").open("a") as f:
            f.write(line + "\n")

    def check_signature(self) -> None:
        """Settings that change results must match the ones the --out folder was started with."""
        a = self.a
        sig = {
            k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
            for k, v in vars(a).items()
            if k in SIGNED
        }
        sig["toy_dir"] = str(a.toy_dir.resolve())
        path = self.out / "study.json"
        old = json.loads(path.read_text()) if path.exists() else {"settings": sig, "bases": {}}
        diff = [k for k in SIGNED if old["settings"].get(k) != sig.get(k)]
        moved = [b for b, p in a.bases.items() if old["bases"].get(b, str(p)) != str(p)]
        if diff or moved:
            raise SystemExit(
                f"{path}: this --out was started with other settings ({', '.join(diff + [f'base {b}' for b in moved])}:"
                f" {[(k, old['settings'].get(k)) for k in diff]}); rerun with those or pick another --out"
            )
        old["bases"].update({b: str(p) for b, p in a.bases.items()})
        path.write_text(json.dumps(old, indent=2))

    def _val_view(self) -> Path:
        view = self.out / "toy_world_val"
        src = self.a.toy_dir.resolve()
        for d in DOMAINS:
            if not (src / "data" / d / "val.jsonl").exists():
                raise SystemExit(
                    f"{src}/data/{d}/val.jsonl is missing: rebuild the toy world (python distill.py +experiment=toy_data)"
                )
            (view / "data" / d).mkdir(parents=True, exist_ok=True)
            link = view / "data" / d / "test.jsonl"
            if not link.is_symlink():
                link.symlink_to(src / "data" / d / "val.jsonl")
        for name in ("manifest.json", "tokenizer"):
            if not (view / name).is_symlink():
                (view / name).symlink_to(src / name)
        return view

    def ready_bases(self) -> list[str]:
        return [b for b, p in self.a.bases.items() if (p / "config.json").exists()]

    def done(self, job: Job) -> bool:
        return jobs.is_done(self.folder(job))

    def folder(self, job: Job) -> Path:
        if job.kind == "train":
            return self.lay.train_dir(job.group, job.spec["domain"])
        if job.kind == "merge":
            return self.lay.merge_dir(job.group, job.spec["step"], job.spec["method"])
        return self.lay.eval_dir(job.key.removeprefix("eval/"))

    # ---- the plan ------------------------------------------------------------------------------
    def groups(self) -> list[Group]:
        """Groups in priority order; a base's extra seeds and mixture once its first seed is scored."""
        a, out = self.a, []
        for base in self.ready_bases():
            first = [Group(base, lr, s) for s in range(a.first_seeds) for lr in a.lrs]
            out += first
            if a.mixture == "all":
                out += [Group(base, g.lr, g.seed, mixture=True) for g in first]
            if all(self.done(j) for g in first for j in self.jobs_of(g)):
                lr = self.picked_lr(base)
                if lr is not None:
                    if base in a.seed_bases:
                        out += [Group(base, lr, s) for s in range(a.first_seeds, a.seeds)]
                    if a.mixture == "picked":
                        out.append(Group(base, lr, 0, mixture=True))
        return out

    def picked_lr(self, base: str) -> float | None:
        """The lr of the criterion's pick on the first seeds (analyze.nearest_pick when none qualifies)."""
        if base not in self.picks:
            self.picks[base] = self._pick(base)
            self.log(f"{base}: first seeds scored; extra seeds and mixture go to lr {self.picks[base]}")
        return self.picks[base]

    def _pick(self, base: str) -> float | None:
        rows = [
            r
            for r in analyze.cell_rows(analyze.load_evals(self.out))
            if r["base"] == base and r["seed"] < self.a.first_seeds
        ]
        pick = analyze.nearest_pick(analyze.seed_stats(rows), base)
        return None if pick is None else pick[0]

    def jobs_of(self, g: Group) -> list[Job]:
        all_jobs = group_jobs(g, self.lay, self.a.methods, self.a.expert_domains)
        if g.mixture:
            return [j for j in all_jobs if j.key.endswith("/mixture")]
        return [j for j in all_jobs if not j.key.endswith("/mixture")]

    def scale(self) -> dict[str, float]:
        """Measured / estimated seconds per job kind, from every finished job's done.json."""
        tot: dict[str, list[float]] = {}
        for f in self.out.rglob(jobs.DONE):
            info = json.loads(f.read_text())
            if info.get("estimate"):
                t = tot.setdefault(info["kind"], [0.0, 0.0])
                t[0] += info["seconds"]
                t[1] += info["estimate"]
        return {k: s / e for k, (s, e) in tot.items() if e > 0}

    def admitted(self) -> list[Job]:
        """Pending jobs of the groups that fit the remaining budget (started groups always do)."""
        scale, left = self.scale(), (self.deadline - time.time()) * self.a.workers
        todo: list[Job] = []
        for base in self.ready_bases():
            bj = base_job(base, self.a.bases[base])
            if not self.done(bj):
                todo.append(bj)
                left -= job_cost(bj, self.a.limit, scale)
        full = False  # once a group does not fit, only groups already started are taken
        for g in self.groups():
            js = self.jobs_of(g)
            pending = [j for j in js if not self.done(j)]
            started = len(pending) < len(js) or any(j.key in self.running for j in js)
            cost = sum(job_cost(j, self.a.limit, scale) for j in pending if j.key not in self.running)
            full = full or (not started and cost > left)
            if full and not started:
                continue
            left -= cost
            todo += pending
        return todo

    # ---- running jobs --------------------------------------------------------------------------
    def execute(self, job: Job) -> float:
        a, g, t0 = self.a, job.group, time.time()
        folder = self.folder(job)
        logf = self.out / "logs" / (job.key.replace("/", "__") + ".log")
        if job.kind == "train":
            d = job.spec["domain"]
            exp = "toy_mixture" if d == "mixture" else f"toy_{d}_branch"
            jobs.run_logged(
                jobs.train_args(
                    experiment=exp,
                    base=a.bases[g.base],
                    run_dir=folder,
                    lr=g.lr,
                    total_steps=job.spec["total"],
                    every=self.lay.every * (MIXTURE_FACTOR if d == "mixture" else 1),
                    warmup_steps=a.warmup_steps,
                    seed=g.seed,
                    toy_dir=a.toy_dir.resolve(),
                    output_dir=self.out,
                    extra=a.train_override,
                ),
                logf,
            )
            self.snapshots(folder, d, job.spec["steps"], g)
        elif job.kind == "merge":
            experts = {d: self.lay.model(g, d, job.spec["step"]) for d in DOMAINS}
            jobs.run_logged(
                jobs.merge_args(job.spec["method"], a.bases[g.base], experts, folder, a.toy_dir.resolve()),
                logf,
            )
        else:
            self.evaluate(job, folder, logf)
        secs = time.time() - t0
        jobs.mark_done(
            folder,
            key=job.key,
            kind=job.kind,
            group=None if g is None else f"{g.base}/{g.tag}",
            seconds=round(secs, 1),
            estimate=round(job_cost(job, a.limit, {}), 1),
            spec=job.spec,
        )
        return secs

    def evaluate(self, job: Job, folder: Path, logf: Path) -> None:
        """`evaluate.py` on the job's model and domains -> <folder>/{results.json, samples.jsonl}."""
        tasks = jobs.suite_tasks(self.a.suite, job.spec["domains"], self.a.limit)
        args = jobs.eval_args(Path(job.spec["model"]), folder, self.a.suite, tasks, self.eval_toy_dir)
        jobs.run_logged(args, logf)

    def snapshots(self, run_dir: Path, domain: str, steps: list[int], g: Group) -> None:
        """HF folders at the intermediate step counts; then the checkpoints go (unless kept)."""
        total = max(steps)
        jobs.check_snapshot_steps(run_dir, steps)
        for s in steps:
            dest = self.lay.model(g, domain, s)
            if s < total and not (dest / "config.json").exists():
                jobs.export_snapshot(run_dir, s, dest)
        if not self.a.keep_checkpoints:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)

    def run(self) -> int:
        import torch

        torch.set_num_threads(1)  # snapshot exports run in this process, beside the workers
        self.out.mkdir(parents=True, exist_ok=True)
        self.check_signature()
        lock = self.out / "runner.pid"
        if lock.exists() and _alive(int(lock.read_text() or 0)):
            raise SystemExit(
                f"{lock}: runner {lock.read_text().strip()} is still working on {self.out}; let it finish or stop it first"
            )
        lock.write_text(str(os.getpid()))
        try:
            return self._loop()
        finally:
            lock.unlink(missing_ok=True)

    def _loop(self) -> int:
        self.log(
            f"study {self.out}: bases {list(self.a.bases)} (ready: {self.ready_bases()}), budget {self.a.budget} min"
        )
        with ThreadPoolExecutor(self.a.workers) as pool:
            while True:
                self._dispatch(pool)
                if self.running:
                    finished, _ = wait(list(self.running.values()), return_when=FIRST_COMPLETED)
                    self._collect(finished)
                    continue
                waiting = [b for b in self.a.bases if b not in self.ready_bases()]
                if waiting and not self.a.no_wait and time.time() < self.deadline:
                    self.log(f"waiting for base(s) {waiting} (config.json not there yet)")
                    time.sleep(60)
                    continue
                break
        self.log(f"stopped: {self.started} jobs run, {len(self.failed)} failed")
        return 1 if self.failed else 0

    def _dispatch(self, pool: ThreadPoolExecutor) -> None:
        if time.time() > self.deadline:
            return
        for job in self.admitted():
            if len(self.running) >= self.a.workers:
                return
            if job.key in self.running or job.key in self.failed:
                continue
            if any(not self.done(self._by_key(dep)) for dep in job.deps):
                continue
            self.log(f"start {job.key}")
            self.running[job.key] = pool.submit(self.execute, job)
            self.started += 1

    def _by_key(self, key: str) -> Job:
        kind, base, tag, *rest = key.split("/")
        lr, seed = float(tag.split("_s")[0].removeprefix("lr")), int(tag.split("_s")[1])
        return Job(
            key,
            kind,
            Group(base, lr, seed),
            spec={"domain": rest[-1]}
            if kind == "train"
            else {"step": int(rest[0].removeprefix("step")), "method": rest[1]},
        )

    def _collect(self, finished) -> None:
        for key, fut in list(self.running.items()):
            if fut in finished:
                del self.running[key]
                try:
                    self.log(f"done  {key} ({fut.result():.0f} s)")
                except Exception as e:  # a failed job is logged and skipped; the others go on
                    self.failed.add(key)
                    self.log(f"FAILED {key}: {e}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return pid > 0 and pid != os.getpid()


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    study = Study(a)
    if a.plan_only:
        study.out.mkdir(parents=True, exist_ok=True)
        scale = study.scale()
        for g in study.groups():
            pend = [j for j in study.jobs_of(g) if not study.done(j)]
            print(
                f"{g.base}/{g.tag}{' mixture' if g.mixture else ''}: {len(pend)} jobs, ~{sum(job_cost(j, a.limit, scale) for j in pend):.0f} core-s"
            )
        return 0
    return study.run()


if __name__ == "__main__":
    sys.exit(main())
