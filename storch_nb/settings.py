"""The settings of a run, checked once: samples, runs, seed, device, dtype,
namespace and the estimator choice (:class:`EstimatorSpec`).

Every entry point (``Story.run`` and friends, ``train``, the ``%%storch``
options and their ``%config`` defaults) checks its values here, so that a bad
value gets the same message wherever it is given.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any

import torch

from .errors import EstimatorError, StoryError

__all__ = [
    "DTYPES",
    "DEVICES",
    "MAX_DRAWS",
    "EstimatorSpec",
    "as_device",
    "as_dtype",
    "dtype_name",
    "estimator_spec",
    "flag",
    "namespace",
    "positive_int",
    "seed",
]

#: the dtype names a run accepts (API and magic alike) and the dtype each means
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float": torch.float32, "single": torch.float32, "f32": torch.float32,
    "float64": torch.float64, "double": torch.float64, "f64": torch.float64,
    "float16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
}  # fmt: skip
#: the device names the options offer (a torch.device or "cuda:1" also works in the API)
DEVICES = ("cpu", "cuda", "auto")
#: samples x runs above this cannot be indexed by torch (int64) nor finished in a lifetime
MAX_DRAWS = 2**53

_EMPTY: dict = {}


def as_dtype(value: Any) -> torch.dtype:
    """A floating torch dtype from a dtype, its name (``"float64"``, ``"torch.float64"``) or None (float32)."""
    if value is None:
        return torch.float32
    if isinstance(value, torch.dtype):
        if not value.is_floating_point:
            raise StoryError(f"dtype must be a floating point type, not {value}", hint="use float32 or float64")
        return value
    if isinstance(value, str):
        found = DTYPES.get(value.strip().lower().removeprefix("torch."))
        if found is not None:
            return found
    raise StoryError(f"unknown dtype {value!r}", hint="use float32 or float64")


def dtype_name(value: Any) -> str:
    """The canonical name (``"float32"``) of a dtype or dtype name."""
    return str(as_dtype(value)).removeprefix("torch.")


_DEVICE_CACHE: dict = {}


def as_device(value: Any) -> torch.device:
    """A torch.device from a device, its name or ``"auto"``/None (CUDA where available)."""
    dev = _DEVICE_CACHE.get(value) if isinstance(value, (str, torch.device)) else None
    if dev is None:
        dev = _resolve_device(value)
        if isinstance(value, (str, torch.device)) and value != "auto":
            _DEVICE_CACHE[value] = dev
    return dev


def _resolve_device(value: Any) -> torch.device:
    if value is None or value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError):
        raise StoryError(f"unknown device {value!r}", hint="use 'cpu', 'cuda' or 'auto'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise StoryError("device 'cuda' was asked for but no CUDA GPU is available", hint="use device='cpu' or 'auto'")
    return dev


def positive_int(name: str, value: Any) -> int:
    """``value`` if it is an int from 1 to :data:`MAX_DRAWS`; else a StoryError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise StoryError(f"{name} must be a positive int, not {value!r}", hint=f"give e.g. {name}=1000")
    if value > MAX_DRAWS:
        raise StoryError(f"{name}={value:,} is more than can ever be run (at most 2**53)",
                         hint=f"use a smaller {name}; runs=R with fewer samples each shows the spread")
    return value


def flag(name: str, value: Any) -> bool:
    """``value`` if it is a bool; else a StoryError naming ``name``."""
    if not isinstance(value, bool):
        raise StoryError(f"{name} must be True or False, not {value!r}", hint=f"give e.g. {name}=True")
    return value


def seed(value: Any) -> int | None:
    """``value`` if it is None or an int that torch's generators accept."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not -(2**63) <= value < 2**64):
        raise StoryError(f"seed must be an int (or None), not {value!r}",
                         hint="give e.g. seed=0, or seed=None to draw from torch's global generator")
    return value


def namespace(value: Any) -> Mapping[str, Any]:
    """The namespace a story reads its outside names from (None: an empty one)."""
    if value is None:
        return _EMPTY
    if not isinstance(value, Mapping):
        raise StoryError(f"namespace must be a mapping (a dict) from name to value, not {type(value).__name__}",
                         hint="pass e.g. namespace=globals() or namespace={'w': w}")
    return value


@dataclass(frozen=True)
class EstimatorSpec:
    """The estimator choice of a run: a default text for the sites without
    ``using`` and texts for named sites (``{"z": "rloo"}``)."""

    default: str = "auto"
    per_site: Mapping[str, str] = field(default_factory=dict)

    @cached_property
    def key(self) -> tuple:
        """A hashable form, for caches."""
        return (self.default, tuple(sorted(self.per_site.items())))

    @cached_property
    def learns_cv(self) -> bool:
        """Whether an estimator named here learns a control variate (RELAX, REBAR, LAX)."""
        return _texts_learn_cv((self.default, *self.per_site.values()))

    def label(self) -> str:
        """The choice as one line of text (``"auto"``, ``"z: rloo, k: enumerate"``)."""
        if not self.per_site:
            return self.default
        parts = [f"{k}: {v}" for k, v in self.per_site.items()]
        return ", ".join(parts if self.default == "auto" else [*parts, f"*: {self.default}"])


@lru_cache(maxsize=256)
def _texts_learn_cv(texts: tuple[str, ...]) -> bool:
    from .estimators import make_estimator

    return any(getattr(make_estimator(text), "trainable", False) for text in texts)


_TEXT_SPECS: dict[str, EstimatorSpec] = {}  # one spec per estimator text (they are immutable)


def estimator_spec(estimator: Any) -> EstimatorSpec:
    """The :class:`EstimatorSpec` of an ``estimator=`` value: None, a text, a mapping
    from site name to text (``"*"``: every other site), or a spec."""
    from .estimators import parse_spec

    if isinstance(estimator, EstimatorSpec):
        return estimator
    if estimator is None:
        estimator = "auto"
    if isinstance(estimator, str):
        spec = _TEXT_SPECS.get(estimator)
        if spec is None:
            parse_spec(estimator)  # checked now, with a clear error
            if len(_TEXT_SPECS) > 256:
                _TEXT_SPECS.clear()
            spec = _TEXT_SPECS[estimator] = EstimatorSpec(estimator)
        return spec
    if isinstance(estimator, Mapping):
        per = {}
        for k, v in estimator.items():
            if not isinstance(v, str):
                raise EstimatorError(f"the estimator for site {k!r} must be text, not {type(v).__name__}",
                                     hint="e.g. estimator={'e': 'pathwise', 'b': 'score(baseline=\"rloo\")'}")
            parse_spec(v)
            per[str(k)] = v
        default = per.pop("*", "auto")
        return EstimatorSpec(default, per)
    raise EstimatorError(
        f"estimator must be text or a mapping from site name to text, not {type(estimator).__name__}",
        hint="e.g. estimator='score(baseline=\"rloo\")' or estimator={'e': 'pathwise'}",
    )
