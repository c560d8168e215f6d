"""A sweep's search space and sampler, from Hydra override syntax to Optuna objects.

    params:                                          Optuna distribution
      steps.0.params.k: interval(0.0, 4.0)          FloatDistribution(0.0, 4.0)
      lr: tag(log, interval(1e-5, 1e-2))            FloatDistribution(1e-5, 1e-2, log=True)
      layers: int(interval(1, 8))                   IntDistribution(1, 8)
      density: range(0.1, 0.9, 0.2)                 FloatDistribution(0.1, 0.9, step=0.2)
      method: choice(ties, dare_ties)  | ties,dare  CategoricalDistribution([...])
      seed: 3                                       fixed: passed to every trial unchanged

    sampler: {type: tpe | gp | cmaes | grid | random | nsgaii, seed: 0, n_startup_trials: 5, ...}

The sampler's other keys go to its constructor; keys it does not take (n_startup_trials for grid)
are dropped with a warning, so swapping samplers is one token: `hydra.sweeper.sampler.type=gp`.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

log = logging.getLogger(__name__)
SAMPLERS = {
    "tpe": "TPESampler",
    "gp": "GPSampler",
    "cmaes": "CmaEsSampler",
    "grid": "GridSampler",
    "random": "RandomSampler",
    "nsgaii": "NSGAIISampler",
}
SINGLE_OBJECTIVE_ONLY = {"cmaes"}


def parse_space(params: dict[str, Any], extra: list[str]) -> tuple[dict[str, Any], list[str]]:
    """(`{name: optuna distribution}`, fixed `key=value` overrides) from the config's `params` and the
    command line's sweep arguments (which win over `params` for the same key)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lines = [f"{k}={v}" for k, v in (params or {}).items()]
    lines += list(extra)
    parsed = {o.get_key_element(): o for o in OverridesParser.create().parse_overrides(lines)}
    space, fixed = {}, []
    for key, override in parsed.items():
        if override.is_sweep_override():
            space[key] = to_distribution(key, override)
        else:
            fixed.append(f"{key}={override.get_value_element_as_str()}")
    return space, fixed


def to_distribution(key: str, override: Any) -> Any:
    """One Hydra sweep override (interval / range / choice / a,b,c, optionally tagged `log`) as an
    Optuna distribution; `int(interval(a, b))` gives integers."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = override.value()
    log_scale = "log" in getattr(value, "tags", set())
    if isinstance(value, ChoiceSweep):
        return CategoricalDistribution(list(value.list))
    if isinstance(value, RangeSweep):
        start, stop, step = value.start, value.stop, value.step
        if all(isinstance(x, int) for x in (start, stop, step)):
            return IntDistribution(int(start), int(stop - step), step=int(step))
        n = int(round((stop - start) / step))
        return FloatDistribution(start, round(start + (n - 1) * step, 12), step=step)
    if isinstance(value, IntervalSweep):
        lo, hi = value.start, value.end
        if isinstance(lo, int) and isinstance(hi, int):
            return IntDistribution(lo, hi, log=log_scale)
        return FloatDistribution(float(lo), float(hi), log=log_scale)
    raise ValueError(
        f"hydra.sweeper.params.{key}: {override.input_line!r} is not interval(), range(), choice() or "
        "a,b,c; write one of those"
    )


def grid_of(space: dict[str, Any]) -> dict[str, list]:
    """The grid a GridSampler walks: every choice of a categorical, every step of a stepped range."""
    from optuna.distributions import CategoricalDistribution

    grid, bad = {}, []
    for name, d in space.items():
        if isinstance(d, CategoricalDistribution):
            grid[name] = list(d.choices)
        elif getattr(d, "step", None) is not None:
            n = int(round((d.high - d.low) / d.step)) + 1
            grid[name] = [type(d.low)(round(d.low + i * d.step, 12)) for i in range(n)]
        else:
            bad.append(name)
    if bad:
        raise ValueError(
            f"sampler.type=grid needs choice() or range() for {bad}: an interval has no grid points"
        )
    return grid


def make_sampler(cfg: dict[str, Any], space: dict[str, Any], n_objectives: int, quiet: bool = False) -> Any:
    """The Optuna sampler named by `cfg['type']`, built with the keys its constructor accepts."""
    import optuna

    cfg = dict(cfg or {})
    kind = cfg.pop("type", "tpe")
    if kind not in SAMPLERS:
        raise ValueError(f"hydra.sweeper.sampler.type={kind!r}: use one of {sorted(SAMPLERS)}")
    if kind in SINGLE_OBJECTIVE_ONLY and n_objectives > 1:
        raise ValueError(
            f"hydra.sweeper.sampler.type={kind} optimises one objective but direction has "
            f"{n_objectives}: use tpe, gp, nsgaii or random for a multi-objective sweep"
        )
    cls = getattr(optuna.samplers, SAMPLERS[kind])
    accepted = set(inspect.signature(cls).parameters)
    dropped = sorted(k for k in cfg if k not in accepted)
    if dropped and not quiet:
        log.warning("hydra.sweeper.sampler: %s does not take %s; ignored", cls.__name__, dropped)
    kwargs = {k: v for k, v in cfg.items() if k in accepted}
    if kind == "grid":
        kwargs["search_space"] = grid_of(space)
    return cls(**kwargs)
