"""Weight initialisations selectable by a model's `init` option (one place for every model family)."""
from __future__ import annotations

from torch import nn


def he_normal_(module: nn.Module) -> nn.Module:
    """He-normal weights (std = sqrt(2 / fan_in), as Keras' he_normal the associated-learning authors
    used, §5.1) and zero biases for every Linear/Conv2d below `module`."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


INITS = {"default": lambda m: m, "he_normal": he_normal_}


def apply_init(module: nn.Module, name: str) -> nn.Module:
    if name not in INITS:
        raise ValueError(f"unknown model init {name!r}; valid: {sorted(INITS)}")
    return INITS[name](module)
