"""Shared fixtures: a small toy world and the full-size toy outputs, each built once per test session,
and Hydra config composition."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
TOY_BASE = ROOT / "branchmerge" / "toy" / "assets" / "toy_base"
TOY_BASE_STRONG = ROOT / "branchmerge" / "toy" / "assets" / "toy_base_strong"  # the demo branches' base

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SMALL_WORLD = {
    "seed": 0,
    "domains": {"math": {}, "code": {}, "science": {}},
    "splits": {"test": 200, "train": 120, "base": 60, "val": 100},
}


TOY_BRANCHES_TEST = "test_each_toy_branch_beats_the_base_on_its_own_domain"
EARLY_JOBS: dict[str, tuple[subprocess.Popen, Path]] = {}  # name -> (process, its folder)


@pytest.hookimpl(trylast=True)  # after -m / -k have deselected: a deselected test starts no job
def pytest_collection_modifyitems(config, items) -> None:
    """Starts the toy-branch job in the background when its test is collected (not in an xdist
    worker, which would start one per worker): niced, its trainings use the core that the mostly
    single-process suite leaves idle, and the test finds them done or nearly so.

    Under pytest-xdist (`make test-parallel`, `--dist loadgroup`): one group per test file, so that a
    file's module-scoped fixtures are built on one worker, and one group for every user of
    `toy_outputs`, so that the full toy world is built once."""
    if not hasattr(config, "workerinput") and any(i.name == TOY_BRANCHES_TEST for i in items):
        import tempfile

        out = Path(tempfile.mkdtemp(prefix="bm-toy-branches-"))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        cmd = ["nice", "-n", "10", sys.executable, "-m", "tests.integration.toy_branches_job", str(out)]
        with (out / "job.log").open("w") as log:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        EARLY_JOBS["toy_branches"] = (proc, out)
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        group = "toy_outputs" if "toy_outputs" in item.fixturenames else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory) -> Path:
    """A toy world (datasets + tokenizer), 200 test and 100 val items per domain, built once per session."""
    from branchmerge.toy.world import SplitSpec, build_world

    out = tmp_path_factory.mktemp("toy_world")
    build_world(
        out,
        seed=SMALL_WORLD["seed"],
        domains=SMALL_WORLD["domains"],
        splits=[SplitSpec(k, v) for k, v in SMALL_WORLD["splits"].items()],
        verify_sample=40,
    )
    return out


@pytest.fixture(scope="session")
def toy_outputs(tmp_path_factory) -> Path:
    """An outputs folder after `python distill.py +experiment=toy_distill` started on an empty one: the
    full toy world (toy_data, which the stage builds first) and the distilled traces, built once per
    session. Tests that need the full-size world read it and write their own runs beside it."""
    out = tmp_path_factory.mktemp("toy_outputs")
    cmd = [sys.executable, "distill.py", "+experiment=toy_distill", f"paths.output_dir={out}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def toy_tokenizer(toy_world):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(toy_world / "tokenizer")


def load_model_entry(name: str, toy_dir: str | Path = "/toy_world"):
    """conf/model/<name>.yaml on its own (its `defaults` applied), with paths.toy_dir set; resolved."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONF / "model" / f"{name}.yaml")
    if "defaults" in cfg:
        base = load_model_entry(cfg.defaults[0], toy_dir)
        own = OmegaConf.to_container(cfg, resolve=False)  # unresolved: its ${paths.*} resolve below
        cfg = OmegaConf.merge(base, {k: v for k, v in own.items() if k != "defaults"})
    paths = {"toy_dir": str(toy_dir), "toy_base": str(TOY_BASE), "toy_base_strong": str(TOY_BASE_STRONG)}
    root = OmegaConf.create({"paths": paths, "model": cfg})
    return OmegaConf.create(OmegaConf.to_container(root.model, resolve=True))


def compose(
    config_name: str,
    overrides: list[str] | None = None,
    run_dir: str | Path = "/tmp/bm-test-run",
    keep_hydra: bool = False,
):
    """Compose conf/<config_name>.yaml as Hydra would for `python <entry>.py <overrides>`; returns the job
    config (without the `hydra` node) with Hydra's runtime interpolations resolvable."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import branchmerge.config.resolvers  # noqa: F401

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = hydra_compose(
            config_name=config_name,
            overrides=[*(overrides or []), f"paths.run_dir={run_dir}"],
            return_hydra_config=True,
        )
        with open_dict(cfg.hydra):
            cfg.hydra.runtime.output_dir = str(run_dir)
            cfg.hydra.runtime.cwd = str(ROOT)
        HydraConfig.instance().set_config(cfg)
        if not keep_hydra:
            with open_dict(cfg):
                del cfg["hydra"]
    return cfg


def pytest_sessionfinish(session, exitstatus) -> None:
    """A background job still running when the session ends (its test deselected by -x, a failure)
    is stopped, and its folder removed."""
    import shutil
    import signal

    for proc, out in EARLY_JOBS.values():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the job and the trainings it started
            proc.wait()
        shutil.rmtree(out, ignore_errors=True)
