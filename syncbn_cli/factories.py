"""Model factories named on the command line: ``--factory MOD:FN``.

``MOD`` is an import path (``sample_models.resnet``) or a file (``path/to/models.py``),
``FN`` a callable that builds the model; it may declare ``input_shape`` (one sample,
without the batch dimension). Every failure becomes ``BadInput``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from syncbn_cli.errors import BadInput, listing, one_line


def build_from_factory(spec: str) -> tuple[nn.Module, tuple[int, ...] | None]:
    """Call the factory named by ``spec``; return the model and its declared input shape."""
    factory = resolve_factory(spec)
    try:
        model = factory()
    except Exception as error:  # noqa: BLE001 - the user's code: report, don't crash
        raise BadInput(f"factory {spec} raised {type(error).__name__}: {one_line(error)}") from None
    if not isinstance(model, nn.Module):
        raise BadInput(f"factory {spec} returned {type(model).__name__}, expected a torch.nn.Module")
    shape = getattr(factory, "input_shape", None)
    return model, tuple(int(n) for n in shape) if shape is not None else None


def resolve_factory(spec: str) -> Callable[[], Any]:
    """The callable named by ``MOD:FN`` (an import path or a ``.py`` file, then a name)."""
    module_name, sep, function_name = spec.rpartition(":")
    if not sep or not module_name or not function_name:
        raise BadInput(f"--factory expects MOD:FN, e.g. sample_models.resnet:resnet_tiny (got {spec!r})")
    module = _import_file(module_name) if module_name.endswith(".py") else _import_module(module_name)
    factory = getattr(module, function_name, None)
    if factory is not None and not callable(factory):
        raise BadInput(
            f"{module_name}:{function_name} is not callable (it is a {type(factory).__name__}): "
            "--factory names a function that builds the model"
        )
    if factory is None:
        available = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise BadInput(f"{module_name} has no function {function_name!r}; callables there: {listing(available)}")
    return factory


def _import_module(name: str) -> Any:
    # Console scripts do not put the working directory on sys.path; users expect their
    # project's modules to import as they do with `python -m`.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name is not None and not (name == error.name or name.startswith(error.name + ".")):
            raise BadInput(f"importing {name} failed: it needs module {error.name!r}, which is not installed") from None
        raise BadInput(
            f"cannot import {name} ({error}); run from the directory that contains it, "
            "or pass a file path such as path/to/models.py:build"
        ) from None
    except Exception as error:  # noqa: BLE001 - the user's module failed while importing
        raise BadInput(f"importing {name} raised {type(error).__name__}: {one_line(error)}") from None


def _import_file(path_text: str) -> Any:
    path = Path(path_text)
    if not path.is_file():
        raise BadInput(f"factory file {path} does not exist")
    module_name = f"syncbn_factory_{abs(hash(path.resolve()))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    # Registered before running it, as `import` does: dataclasses and pickle look the
    # module up in sys.modules.
    sys.modules[module_name] = module
    sys.path.insert(0, str(path.resolve().parent))  # so the file can import its neighbours
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    except Exception as error:  # noqa: BLE001 - the user's file failed while importing
        del sys.modules[module_name]
        raise BadInput(f"importing {path} raised {type(error).__name__}: {one_line(error)}") from None
    finally:
        sys.path.remove(str(path.resolve().parent))
    return module
