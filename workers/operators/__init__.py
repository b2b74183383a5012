"""Merge operators. Every module in this package registers its operator on import."""

import importlib
import pkgutil

from workers.operators.base import (
    OPERATORS,
    MergeContext,
    Operator,
    OpParams,
    check_recipe,
    register,
    resolve,
)

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["OPERATORS", "MergeContext", "OpParams", "Operator", "check_recipe", "register", "resolve"]
