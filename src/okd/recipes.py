"""Which recipe a run used: okd's common protocol, or the method's authors' recipe.

A comparison table trains every method with one protocol (``configs/cifar100.yml``: SGD with Nesterov,
lr 0.1 dropped x0.1 after epochs 150 and 225 of 300, the dataset's backbone). Some authors trained their
method otherwise (MCL's cosine schedule, SwitOKD's own teacher and schedule); ``Method.recipe`` lists those
keys with the authors' values and ``configs/methods/<name>.yml`` sets them. A run's label says which
of the two its config follows, so a number is never compared with the wrong published one:

  "authors' recipe"   every key of the method's recipe has the authors' value
  "common protocol"   none has (or the method's authors used the common protocol: an empty recipe)
  "mixed (...)"       some have: the label names the keys that differ from the authors'

The label is written to the run's log.txt, the results record (``recipe``) and the report's columns.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping

COMMON = "common protocol"
AUTHORS = "authors' recipe"


def dotted(cfg: Mapping, key: str) -> Any:
    """``cfg["a"]["b"]`` for ``key`` "a.b" (None where a part is missing)."""
    value: Any = cfg
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        a_list = list(a) if isinstance(a, (list, tuple)) else [a]
        b_list = list(b) if isinstance(b, (list, tuple)) else [b]
        # one backbone name stands for every network of a cohort: [x, x] is x
        if len(set(map(str, a_list))) == 1 and len(set(map(str, b_list))) == 1:
            return str(a_list[0]) == str(b_list[0])
        return len(a_list) == len(b_list) and all(_same(x, y) for x, y in zip(a_list, b_list))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b and type(a) is type(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def recipe_of(method: str) -> Dict[str, Any]:
    """The authors' recipe of ``method`` ({} for an unknown method)."""
    from .methods import METHODS

    return dict(METHODS.get(method).recipe) if method in METHODS else {}


def differing(cfg: Mapping, recipe: Mapping[str, Any]) -> List[str]:
    """The recipe's keys whose value in ``cfg`` (a config as a dict) is not the authors'."""
    return [key for key, value in recipe.items() if not _same(dotted(cfg, key), value)]


def recipe_label(cfg: Mapping) -> str:
    """The recipe a run's config (as a dict) follows, see the module's docstring."""
    recipe = recipe_of(str(dotted(cfg, "method.name")))
    off = differing(cfg, recipe)
    if not recipe or len(off) == len(recipe):
        return COMMON
    if not off:
        return AUTHORS
    return f"mixed (not the authors': {', '.join(off)})"

