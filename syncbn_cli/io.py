"""Reading models and checkpoints, writing converted weights.

Sources a user may point at:
- a ``.safetensors`` file, or a ``.pt``/``.pth``/``.bin`` state dict, with the architecture
  from ``--factory MOD:FN`` (``MOD`` an import path or a ``path/to/file.py``);
- a real training checkpoint: the state dict nested under ``state_dict``, ``model``,
  ``model_state_dict`` (or ``--key NAME``) beside optimizer state and epoch counters,
  with the ``module.`` prefix DataParallel/DDP add, or ``_orig_mod.`` from torch.compile;
- a pickled whole module, loaded only with ``--trust-pickle``: unpickling runs arbitrary
  code, so by default ``torch.load(weights_only=True)`` is used and a pickled model is
  refused with the name of the class it holds.

Everything a user can get wrong becomes ``BadInput`` with what is wrong and what to do.
Files are written to a temporary file beside the target and renamed into place, so a
failure never leaves a partial file.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import pickle
import sys
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from syncbn_cli.errors import BadInput

NESTED_STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "module", "net", "network")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
SHOWN = 8  # how many names an error lists before "and N more"


@dataclass
class LoadedModel:
    """A model ready to use, and where it came from.

    Attributes:
        model: the module (built by the factory and loaded, or unpickled).
        source: the checkpoint file, or None when the model came from the factory alone.
        factory: the ``MOD:FN`` spec, if one was used.
        input_shape: one sample's shape declared by the factory (``fn.input_shape``), if any.
    """

    model: nn.Module
    source: Path | None
    factory: str | None
    input_shape: tuple[int, ...] | None


def load_model(
    source: Path | None, factory: str | None, *, trust_pickle: bool = False, key: str | None = None
) -> LoadedModel:
    """Build the model a command works on from a checkpoint and/or a factory."""
    if source is None and factory is None:
        raise BadInput("no model given: pass a checkpoint file, --factory MOD:FN, or both")
    if factory is not None and trust_pickle:
        raise BadInput("--factory and --trust-pickle exclude each other: a factory builds the model itself")
    built, input_shape = build_from_factory(factory) if factory is not None else (None, None)
    if source is None:
        return LoadedModel(built, None, factory, input_shape)
    content = read_checkpoint(source, trust_pickle=trust_pickle, key=key)
    if isinstance(content, nn.Module):
        return LoadedModel(content, source, None, None)
    if built is None:
        raise BadInput(
            f"{source} holds a state dict ({len(content)} tensors) but no architecture: "
            "pass --factory MOD:FN naming a function that builds the model"
        )
    load_state_dict_strictly(built, content, source)
    return LoadedModel(built, source, factory, input_shape)


# ------------------------------------------------------------------------------ factories


def build_from_factory(spec: str) -> tuple[nn.Module, tuple[int, ...] | None]:
    """Call the factory named by ``spec``; return the model and its declared input shape."""
    factory = resolve_factory(spec)
    try:
        model = factory()
    except Exception as error:  # noqa: BLE001 - the user's code: report, don't crash
        raise BadInput(f"factory {spec} raised {type(error).__name__}: {error}") from None
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
    if factory is None or not callable(factory):
        available = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise BadInput(f"{module_name} has no function {function_name!r}; callables there: {_listing(available)}")
    return factory


def _import_module(name: str) -> Any:
    # Console scripts do not put the working directory on sys.path; users expect their
    # project's modules to import as they do with `python -m`.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        raise BadInput(
            f"cannot import {name} ({error}); run from the directory that contains it, "
            "or pass a file path such as path/to/models.py:build"
        ) from None
    except Exception as error:  # noqa: BLE001 - the user's module failed while importing
        raise BadInput(f"importing {name} raised {type(error).__name__}: {error}") from None


def _import_file(path_text: str) -> Any:
    path = Path(path_text)
    if not path.is_file():
        raise BadInput(f"factory file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"syncbn_factory_{abs(hash(path.resolve()))}", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.path.insert(0, str(path.resolve().parent))  # so the file can import its neighbours
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    except Exception as error:  # noqa: BLE001 - the user's file failed while importing
        raise BadInput(f"importing {path} raised {type(error).__name__}: {error}") from None
    finally:
        sys.path.remove(str(path.resolve().parent))
    return module


# ---------------------------------------------------------------------------- checkpoints


def read_checkpoint(
    path: Path, *, trust_pickle: bool = False, key: str | None = None
) -> Mapping[str, Tensor] | nn.Module:
    """A state dict (unwrapped from a training checkpoint) or, with ``trust_pickle``, a module."""
    if not path.exists():
        raise BadInput(f"{path}: no such file")
    if not path.is_file():
        raise BadInput(f"{path} is not a file")
    if path.suffix == ".safetensors":
        content: Any = _read_safetensors(path)
    else:
        content = _read_torch_file(path, trust_pickle)
    if isinstance(content, nn.Module):
        return content
    return _find_state_dict(content, path, key)


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise BadInput(f"cannot read {path} as safetensors ({error}); is the file complete?") from None


def _read_torch_file(path: Path, trust_pickle: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError:
        if not trust_pickle:
            held = _pickled_classes(path)
            if held:
                raise BadInput(
                    f"{path} holds a pickled {held[0]} (a whole object, not a state dict); unpickling runs "
                    "arbitrary code, so it was not loaded. If you trust the file, pass --trust-pickle; "
                    "better, save model.state_dict() and pass --factory MOD:FN"
                ) from None
        raise BadInput(f"cannot read {path} as a PyTorch checkpoint; is it a complete .pt file?") from None
    except (
        RuntimeError,
        OSError,
        EOFError,
        ValueError,
        zipfile.BadZipFile,
        AttributeError,
        ModuleNotFoundError,
    ) as error:
        raise BadInput(
            f"cannot read {path} as a PyTorch checkpoint ({type(error).__name__}: {error}); is the file complete?"
        ) from None


def _pickled_classes(path: Path) -> list[str]:
    """Classes a pickle would import, the user's own first (without unpickling anything)."""
    try:
        names = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - not a readable pickle: nothing to name
        return []
    return sorted(names, key=lambda name: (name.startswith(("torch.", "collections.", "builtins.")), name))


def _find_state_dict(content: Any, path: Path, key: str | None) -> dict[str, Tensor]:
    if not isinstance(content, Mapping):
        raise BadInput(f"{path} is not a checkpoint: it holds a {type(content).__name__}, not a state dict")
    if key is not None:
        if key not in content:
            raise BadInput(f"{path} has no key {key!r}; its keys: {_listing(map(str, content))}")
        content = content[key]
    elif not _is_state_dict(content):
        found = next((k for k in NESTED_STATE_DICT_KEYS if k in content and _is_state_dict(content[k])), None)
        if found is None:
            raise BadInput(
                f"{path} is not a state dict and none of its keys ({_listing(map(str, content))}) holds one; "
                "pass --key NAME to say where the weights are"
            )
        content = content[found]
    if isinstance(content, nn.Module):
        return content  # type: ignore[return-value]
    if not _is_state_dict(content):
        raise BadInput(f"{path}: {key!r} does not hold a state dict of tensors")
    return _strip_wrapper_prefixes(dict(content))


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(isinstance(v, Tensor) for v in value.values())


def _strip_wrapper_prefixes(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
    return state_dict


def load_state_dict_strictly(model: nn.Module, state_dict: Mapping[str, Tensor], source: Path) -> None:
    """Load ``state_dict`` into ``model``, listing every missing, unexpected or misshapen key."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshapen = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if misshapen:
        problems.append(f"shape mismatches (file vs model): {_listing(misshapen)}")
    if problems:
        raise BadInput(
            f"{source} does not fit the factory's model: "
            + "; ".join(problems)
            + ". Is --factory the right architecture?"
        )
    model.load_state_dict(state_dict, strict=True)


# ------------------------------------------------------------------------------- writing


def check_writable(path: Path, *, force: bool) -> None:
    """Fail early, before any work, if ``path`` cannot be written."""
    if path.exists() and not force:
        raise BadInput(f"{path} exists; pass --force to overwrite it")
    if path.exists() and not path.is_file():
        raise BadInput(f"{path} exists and is not a file")
    if not path.parent.is_dir():
        raise BadInput(f"cannot write {path}: directory {path.parent} does not exist")


def save_weights(state_dict: Mapping[str, Tensor], path: Path, metadata: Mapping[str, Any], *, force: bool) -> None:
    """Write ``state_dict`` to ``path`` atomically: safetensors (metadata under "syncbn"), or .pt.

    Safetensors needs contiguous tensors that share no storage, so each is copied.
    """
    check_writable(path, force=force)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        if path.suffix == ".safetensors":
            save_file(tensors, temp_name, metadata={"format": "pt", "syncbn": json.dumps(dict(metadata))})
        else:
            torch.save(tensors, temp_name)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def read_syncbn_metadata(path: Path) -> dict[str, Any] | None:
    """The metadata ``save_weights`` recorded in a safetensors file, or None."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        raw = (handle.metadata() or {}).get("syncbn")
    return json.loads(raw) if raw else None


def _listing(names: Any) -> str:
    names = list(names)
    shown = ", ".join(names[:SHOWN])
    return shown + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "") if names else "(none)"
