"""Search spaces: parsed from the config's ``tune.space``, checked against the config tree, and
turned into Ray Tune domains.

A space maps dotted config keys to one distribution each::

    tune:
      space:
        loss.margin: {loguniform: [0.05, 0.5]}
        loss.dscmr.alpha: {uniform: [0.01, 1.0]}
        loss.kind: {choice: [vse_mh, infonce]}
        train.lr: {grid: [1.0e-3, 3.0e-4]}

``uniform`` / ``loguniform`` take ``[low, high]`` (integers for integer keys), ``choice`` samples
one of a list, ``grid`` runs every value of a list (with ``tune.search: random`` only; each grid
point is crossed with every other grid key and repeated ``tune.num_samples`` times). Keys may
also be nested (``loss: {margin: {uniform: [0.1, 0.3]}}``), as a dotted command-line override
such as ``tune.space.loss.margin={uniform: [0.1, 0.3]}`` produces. An empty space means
:func:`default_space`: the margins, loss weights and alphas of the parts the config enables.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any

from raycmr.config import Config, ConfigError, with_overrides

KINDS = ("uniform", "loguniform", "choice", "grid")


@dataclass(frozen=True)
class ParamSpec:
    """One searched key: its distribution kind and arguments (``[low, high]`` or values)."""

    key: str
    kind: str
    args: tuple

    def to_dict(self) -> dict[str, list]:
        """The YAML form, ``{kind: [args...]}``."""
        return {self.kind: list(self.args)}


# (key, kind, args, when): ``when`` says whether the config uses the key at all.
_DEFAULTS: list[tuple[str, str, tuple, Any]] = [
    ("loss.margin", "loguniform", (0.05, 0.5), lambda c: c.loss.kind in ("vse_mh", "vse_sh")),
    ("loss.temperature", "loguniform", (0.02, 0.2), lambda c: c.loss.kind == "infonce"),
    ("loss.weight", "uniform", (0.1, 1.0),
     lambda c: c.loss.kind != "none"
     and (c.loss.grl.enabled or c.loss.dscmr.enabled or c.loss.distill.enabled
          or c.train.task == "dckt")),
    ("loss.grl.alpha", "uniform", (0.1, 1.0), lambda c: c.loss.grl.enabled),
    ("loss.dscmr.alpha", "loguniform", (0.03, 3.0), lambda c: c.loss.dscmr.enabled),
    ("loss.dscmr.beta", "loguniform", (0.01, 1.0), lambda c: c.loss.dscmr.enabled),
    ("loss.distill.weight", "loguniform", (0.03, 3.0), lambda c: c.loss.distill.enabled),
    ("dckt.alpha", "uniform", (0.5, 1.0), lambda c: c.train.task == "dckt"),
    ("train.lr", "loguniform", (1e-4, 3e-3), lambda c: True),
]

#: Every key the default space may search, with its distribution (for documentation and tests).
DEFAULT_SPACE: dict[str, dict[str, list]] = {k: {kind: list(a)} for k, kind, a, _ in _DEFAULTS}


def default_space(cfg: Config) -> dict[str, ParamSpec]:
    """The default space restricted to what ``cfg`` enables: VSE++ margin (or the InfoNCE
    temperature), the contrastive weight when other loss terms exist, the GRL ceiling alpha, the
    DSCMR alpha/beta, the distillation weight, the DCKT selection ceiling alpha (for when DCKT
    runs can be searched), and the learning rate."""
    return {k: ParamSpec(k, kind, tuple(a)) for k, kind, a, when in _DEFAULTS if when(cfg)}


def _flatten(cfg: Config, raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested ``{loss: {margin: {uniform: ...}}}`` -> ``{"loss.margin": {uniform: ...}}``: a
    mapping under a config section descends into it; anything else is one key's entry."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        is_entry = isinstance(value, dict) and len(value) == 1 and next(iter(value)) in KINDS
        if isinstance(value, dict) and not is_entry and _is_section(cfg, dotted):
            out.update(_flatten(cfg, value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _is_section(cfg: Config, key: str) -> bool:
    try:
        return dataclasses.is_dataclass(cfg.get(key))
    except AttributeError:
        return False


def _leaf_keys(obj: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys.extend(_leaf_keys(value, f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _check_key(cfg: Config, key: str) -> Any:
    """The current value of ``key``; a ConfigError naming it when it is not a config value."""
    if key.startswith("tune."):
        raise ConfigError(f"tune.space key '{key}' cannot be searched: tune.* settings steer the "
                          "search itself")
    try:
        value = cfg.get(key)
    except AttributeError:
        close = difflib.get_close_matches(key, _leaf_keys(cfg), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else " (keys look like loss.margin)"
        raise ConfigError(f"tune.space key '{key}' is not a config key{hint}") from None
    if dataclasses.is_dataclass(value):
        raise ConfigError(f"tune.space key '{key}' is a config section, not a value: name a key "
                          f"inside it, e.g. '{key}.{dataclasses.fields(value)[0].name}'")
    return value


def _parse_one(cfg: Config, key: str, raw: Any) -> ParamSpec:
    current = _check_key(cfg, key)
    if not (isinstance(raw, dict) and len(raw) == 1 and next(iter(raw)) in KINDS):
        raise ConfigError(f"tune.space['{key}'] must be one of {{uniform: [low, high]}}, "
                          f"{{loguniform: [low, high]}}, {{choice: [...]}}, {{grid: [...]}}; "
                          f"got {raw!r}")
    kind, args = next(iter(raw.items()))
    if not isinstance(args, (list, tuple)) or not args:
        raise ConfigError(f"tune.space['{key}'].{kind} needs a non-empty list, got {args!r}")
    if kind in ("uniform", "loguniform"):
        numeric = all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
        if len(args) != 2 or not numeric:
            raise ConfigError(f"tune.space['{key}'].{kind} needs [low, high] numbers, "
                              f"got {args!r}")
        if not isinstance(current, (int, float)) or isinstance(current, bool):
            raise ConfigError(f"tune.space['{key}'].{kind} needs a numeric key, but {key} is "
                              f"{current!r}: use choice or grid")
        low, high = args
        if not low < high:
            raise ConfigError(f"tune.space['{key}'].{kind} needs low < high, got {args!r}")
        if kind == "loguniform" and low <= 0:
            raise ConfigError(f"tune.space['{key}'].loguniform needs low > 0, got {low!r}")
        if isinstance(current, int) and not (float(low).is_integer() and float(high).is_integer()):
            raise ConfigError(f"tune.space['{key}'].{kind} bounds must be integers: {key} is an "
                              f"integer key, got {args!r}")
        candidates: list[Any] = [low, high]
    else:
        candidates = list(args)
    for value in candidates:  # every value must make a valid config
        try:
            with_overrides(cfg, {key: value})
        except ConfigError as exc:
            raise ConfigError(f"tune.space['{key}'] value {value!r} is not valid: {exc}") from None
    return ParamSpec(key, kind, tuple(args))


def parse_space(cfg: Config, raw: dict[str, Any] | None = None) -> dict[str, ParamSpec]:
    """The searched keys of ``raw`` (default: ``cfg.tune.space``; when that is empty, the
    :func:`default_space`), each checked against the config. Raises ConfigError naming the key."""
    raw = cfg.tune.space if raw is None else raw
    if not raw:
        return default_space(cfg)
    if not isinstance(raw, dict):
        raise ConfigError(f"tune.space must be a mapping of config keys to distributions, "
                          f"got {raw!r}")
    return {key: _parse_one(cfg, key, value) for key, value in _flatten(cfg, raw).items()}


def check_search(specs: dict[str, ParamSpec], search: str) -> None:
    """Raise a ConfigError when the search algorithm cannot handle the space."""
    if search == "optuna":
        grid = [s.key for s in specs.values() if s.kind == "grid"]
        if grid:
            raise ConfigError(f"tune.space['{grid[0]}'] uses grid, which tune.search=optuna does "
                              "not support: use choice, or tune.search=random")
    if not specs:
        raise ConfigError("tune.space is empty and the default space has nothing to search")


def to_tune(spec: ParamSpec, current: Any) -> Any:
    """The Ray Tune domain for one spec (integer keys get integer domains)."""
    from ray import tune

    if spec.kind == "grid":
        return tune.grid_search(list(spec.args))
    if spec.kind == "choice":
        return tune.choice(list(spec.args))
    low, high = spec.args
    if isinstance(current, int) and not isinstance(current, bool):
        fn = tune.randint if spec.kind == "uniform" else tune.lograndint
        return fn(int(low), int(high) + 1)  # upper bound exclusive in Tune
    return (tune.uniform if spec.kind == "uniform" else tune.loguniform)(low, high)


def param_space(cfg: Config, specs: dict[str, ParamSpec]) -> dict[str, Any]:
    """Tune's ``param_space``: flat dotted keys -> domains (grids included)."""
    return {key: to_tune(spec, cfg.get(key)) for key, spec in specs.items()}


def max_value(spec: ParamSpec) -> Any:
    """The largest value a spec can produce (for ASHA's max_t when train.epochs is searched)."""
    return max(spec.args) if spec.kind in ("choice", "grid") else spec.args[1]


def is_log(spec: ParamSpec) -> bool:
    """Whether the spec is best plotted on a log axis."""
    if spec.kind == "loguniform":
        return True
    values = [v for v in spec.args if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return len(values) == len(spec.args) and min(values) > 0 and \
        math.log10(max(values) / min(values)) >= 2
