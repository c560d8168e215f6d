"""OmegaConf resolvers used in conf/ (registered on import by the entry points).

${bm_cwd:}                        the working directory (unlike ${hydra:runtime.cwd}, also resolvable
                                 by a sweeper before any job starts)
${bm_model_tag:${model_path}}   outputs/train/toy_math_branch/export -> toy_math_branch
${bm_dir_name:${hydra.job.override_dirname}}   a sweep trial's folder name: one path component
${bm_sqlite:${paths.output_dir}/sweeps/x/optuna.db}  sqlite:///<abs path>, its folder created (an
                                                    Optuna study's storage must be openable at start)
"""

import hashlib
import os
from pathlib import Path, PurePath

from omegaconf import OmegaConf


def model_tag(path: str) -> str:
    p = PurePath(str(path))
    parts = [x for x in p.parts if x not in ("export", "model", "/")]
    return parts[-1] if parts else "model"


def dir_name(text: str, max_len: int = 120) -> str:
    """`text` as one folder name: path separators become '_', an over-long name keeps its head and a
    short hash of the whole (so two trials never share a folder)."""
    name = str(text).replace("/", "_").replace("\\", "_") or "default"
    if len(name) > max_len:
        name = name[: max_len - 13] + "-" + hashlib.sha1(name.encode()).hexdigest()[:12]
    return name


def sqlite_url(path: str) -> str:
    p = Path(path).absolute()
    p.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{p}"


if not OmegaConf.has_resolver("bm_cwd"):
    OmegaConf.register_new_resolver("bm_cwd", lambda: os.getcwd())
if not OmegaConf.has_resolver("bm_sqlite"):
    OmegaConf.register_new_resolver("bm_sqlite", sqlite_url)
if not OmegaConf.has_resolver("bm_model_tag"):
    OmegaConf.register_new_resolver("bm_model_tag", model_tag)
if not OmegaConf.has_resolver("bm_dir_name"):
    OmegaConf.register_new_resolver("bm_dir_name", dir_name)
