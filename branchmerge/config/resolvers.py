"""OmegaConf resolvers used in conf/ (registered on import by the entry points).

${bm_model_tag:${model_path}}   outputs/train/toy_math_branch/export -> toy_math_branch
"""

from pathlib import PurePath

from omegaconf import OmegaConf


def model_tag(path: str) -> str:
    p = PurePath(str(path))
    parts = [x for x in p.parts if x not in ("export", "model", "/")]
    return parts[-1] if parts else "model"


if not OmegaConf.has_resolver("bm_model_tag"):
    OmegaConf.register_new_resolver("bm_model_tag", model_tag)
