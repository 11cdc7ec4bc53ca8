"""Registers method `failing`, whose loss raises, in every Python process started with this folder on PYTHONPATH.

Python imports `sitecustomize` at start-up, so with this folder first on the PYTHONPATH of a study's
driver (tests/test_study_e2e.py) both the driver, whose parser takes method names from
`study.science.config.METHODS`, and the Ray workers it starts (they inherit the environment) see the method.
The loss joins `study.science.losses.LOSSES` only when a process imports that module, so processes that never
train (Ray's own helpers) do not import torch for it.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any, Sequence

from study.science.config import METHODS, MethodSpec

NAME = "failing"
MESSAGE = "injected fault: the loss of test method `failing` raises"

METHODS[NAME] = MethodSpec("affine", True, NAME, None, order=len(METHODS), doc="test only: its loss raises")


def failing_loss(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError(MESSAGE)


class _RegisterLossOnImport(importlib.abc.MetaPathFinder):
    """Adds `failing_loss` to `study.science.losses.LOSSES` right after that module runs."""

    def find_spec(self, name: str, path: Sequence[str] | None, target: ModuleType | None = None) -> ModuleSpec | None:
        if name != "study.science.losses":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.loader is not None
        run = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            module.LOSSES[NAME] = failing_loss

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


sys.meta_path.insert(0, _RegisterLossOnImport())
