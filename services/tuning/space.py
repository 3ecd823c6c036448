"""What `focalloop tune` searches: gamma x alpha, as the focal-loss tuning guides lay it out.

A setting is one (gamma, alpha) pair; `to_loss` turns it into the project's `LossSpec`, so every
value a study can propose passes the same checks a project's settings do (`LossSpec`'s bounds:
gamma in [0, MAX_GAMMA], alpha weights in [0, MAX_ALPHA]). gamma = 0 is cross-entropy with the
same alpha, the baseline every study evaluates.

alpha is named by a string so that a grid cell has one label everywhere (table, heatmap, JSON):
    "none"               no class weights
    "inverse_frequency"  weights proportional to 1 / count, computed on each training fold
    "effective_number"   (1 - beta) / (1 - beta^count) (Cui et al. 2019), beta 0.999 by default
    "binary:0.25"        binary projects only: the guides' scalar alpha on the rarer class and
                         1 - alpha on the other (RetinaNet's alpha-balanced form)
"""

from dataclasses import dataclass, replace
from typing import Any, cast

from services.errors import InvalidInput
from services.ml.train import LossSpec

# The search range the guides use; LossSpec accepts up to MAX_GAMMA (10), but past 5 the
# modulating factor leaves almost no gradient on items the model already gets half right.
GAMMA_RANGE = (0.0, 5.0)
GRID_GAMMAS = (0.0, 0.5, 1.0, 2.0, 3.0)
ALPHA_SCHEMES = ("none", "inverse_frequency", "effective_number")
BINARY_ALPHA_RANGE = (0.1, 1.0)
BINARY_PREFIX = "binary:"


@dataclass(frozen=True)
class Setting:
    """One point of the space: gamma >= 0 and an alpha name (module docstring)."""

    gamma: float
    alpha: str

    @property
    def key(self) -> str:
        """A stable label: 'gamma=2 alpha=effective_number'."""
        return f"gamma={self.gamma:g} alpha={self.alpha}"


def check_setting(setting: Setting, n_classes: int) -> Setting:
    """The setting when valid for a project of `n_classes`; InvalidInput naming what is wrong."""
    low, high = GAMMA_RANGE
    if not low <= setting.gamma <= high:
        raise InvalidInput(f"gamma must be in [{low:g}, {high:g}], got {setting.gamma:g}")
    if setting.alpha in ALPHA_SCHEMES:
        return setting
    if setting.alpha.startswith(BINARY_PREFIX):
        if n_classes != 2:
            raise InvalidInput(
                f"a scalar alpha ({setting.alpha}) is for binary projects; this one has "
                f"{n_classes} classes"
            )
        try:
            value = float(setting.alpha.removeprefix(BINARY_PREFIX))
        except ValueError:
            raise InvalidInput(f"alpha {setting.alpha!r} is not a number") from None
        a_low, a_high = BINARY_ALPHA_RANGE
        if not a_low <= value <= a_high:
            raise InvalidInput(f"a binary alpha must be in [{a_low:g}, {a_high:g}], got {value:g}")
        return setting
    raise InvalidInput(
        f"unknown alpha {setting.alpha!r}; choose one of {list(ALPHA_SCHEMES)} or "
        f"'{BINARY_PREFIX}A' with A in {list(BINARY_ALPHA_RANGE)} for a binary project"
    )


def to_loss(setting: Setting, base: LossSpec, *, rare_class: int) -> LossSpec:
    """The project's loss (`base`: its prior-bias and beta) with this gamma and alpha.

    rare_class: index of the rarer class, which a binary scalar alpha weights."""
    if setting.alpha == "none":
        alpha: str | tuple[float, ...] | None = None
    elif setting.alpha.startswith(BINARY_PREFIX):
        value = float(setting.alpha.removeprefix(BINARY_PREFIX))
        alpha = (1.0 - value, value) if rare_class == 1 else (value, 1.0 - value)
    else:
        alpha = setting.alpha
    return replace(base, kind="focal", gamma=setting.gamma, alpha=cast(Any, alpha))


def grid(n_classes: int, gammas: tuple[float, ...] = GRID_GAMMAS) -> list[Setting]:
    """The guide's grid: `gammas` x the three alpha schemes (15 settings by default), gamma-major
    so the cross-entropy baselines come first."""
    settings = [Setting(gamma, alpha) for gamma in gammas for alpha in ALPHA_SCHEMES]
    return [check_setting(setting, n_classes) for setting in settings]
