"""The recipe's field constraints (metadata the loader checks) and the registries some fields name."""
from __future__ import annotations


# --- field constraints -------------------------------------------------------
# A constraint is (description, predicate); the description completes "expected ...".
def _positive():
    return {"check": ("a positive number", lambda v: v > 0)}


def _non_negative():
    return {"check": ("a number >= 0", lambda v: v >= 0)}


def _at_least(n, most=None):
    if most is None:
        return {"check": (f"an integer >= {n}", lambda v: v >= n)}
    # an upper bound where a larger value is a typo that would only fail later (out of memory, hours of work)
    return {"check": (f"an integer in [{n}, {most}]", lambda v: n <= v <= most)}


def _unit(open_right=False):
    if open_right:
        return {"check": ("a number in [0, 1)", lambda v: 0 <= v < 1)}
    return {"check": ("a number in [0, 1]", lambda v: 0 <= v <= 1)}


def _open_unit():
    return {"check": ("a number in (0, 1)", lambda v: 0 < v < 1)}


def _half_open_unit():
    return {"check": ("a number in (0, 1]", lambda v: 0 < v <= 1)}


# --- extension points ----------------------------------------------------------
# A field whose values name an entry of a plain-dict registry: adding a data source or a KD loss is one entry in
# its own module. The registries are imported when a recipe is checked, not here: their modules import the
# schema (cycles), and they pull in torch and friends.
def _data_sources() -> tuple[str, ...]:
    from distill.data.sources import SOURCES

    return tuple(SOURCES)


def _kd_losses() -> tuple[str, ...]:
    from distill.losses import KD_LOSSES

    return ("none", *KD_LOSSES)  # none: a recipe-level value, the labels-only baseline (no KD term)


def model_sources() -> dict[str, str]:
    """The model families a `model: "<prefix>:<name>"` may name, each with its form for messages
    ({"hf": "hf:<hub id or dir>", "timm": "timm:<name>"})."""
    from distill.models.sources import SOURCES

    return {prefix: source.usage for prefix, source in SOURCES.items()}


def _one_of(names):
    # checked like a Literal (same message, any value not in the registry), but the names are looked up late
    return {"choices": names}
