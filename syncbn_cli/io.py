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

import functools
import json
import os
import pickle
import pickletools
import stat
import tempfile
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from syncbn_cli.errors import BadInput, listing, one_line
from syncbn_cli.factories import build_from_factory

NESTED_STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "module", "net", "network")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


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
        return LoadedModel(_unwrap_parallel(content), source, None, None)
    if built is None:
        instead = ", instead of --trust-pickle" if trust_pickle else ""
        raise BadInput(
            f"{source} holds a state dict ({len(content)} tensors) but no architecture: "
            f"pass --factory MOD:FN naming a function that builds the model{instead}"
        )
    load_state_dict_strictly(built, content, source)
    return LoadedModel(built, source, factory, input_shape)


def default_output_path(source: Path) -> Path:
    """Where ``convert`` writes when no ``-o`` is given: ``<stem>.syncbn.safetensors`` beside ``source``.

    Example:
        >>> default_output_path(Path("runs/model.pt")).as_posix()
        'runs/model.syncbn.safetensors'
    """
    return source.with_name(f"{source.stem}.syncbn.safetensors")


def _unwrap_parallel(model: nn.Module) -> nn.Module:
    # A pickled nn.DataParallel/DDP model: work on (and save) the model inside, so the
    # written keys carry no "module." prefix.
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


# ---------------------------------------------------------------------------- checkpoints


def read_checkpoint(
    path: Path, *, trust_pickle: bool = False, key: str | None = None
) -> Mapping[str, Tensor] | nn.Module:
    """A state dict (unwrapped from a training checkpoint) or, with ``trust_pickle``, a module."""
    check_readable(path)
    if path.suffix == ".safetensors":
        content: Any = _read_safetensors(path)
    else:
        content = _read_torch_file(path, trust_pickle)
    if isinstance(content, nn.Module):
        return content
    return _find_state_dict(content, path, key)


# Words a user may write after a flag that takes no value (``--json true``).
_FLAG_VALUES = ("true", "false", "yes", "no", "on", "off", "1", "0")


def check_readable(path: Path) -> None:
    """Fail early, before any work, if ``path`` is not a file this process can read."""
    if not path.exists() and str(path).lower() in _FLAG_VALUES:
        raise BadInput(f"{path}: no such file; flags take no value (write --json, not --json {path})")
    if not path.exists():
        raise BadInput(f"{path}: no such file")
    if not path.is_file():
        raise BadInput(f"{path} is not a file")
    try:
        with path.open("rb"):
            pass
    except OSError as error:
        raise BadInput(f"cannot open {path}: {error.strerror or error}") from None


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise _unreadable_safetensors(path, error) from None


def _unreadable_safetensors(path: Path, error: Exception) -> BadInput:
    return BadInput(
        f"cannot read {path} as safetensors ({one_line(error)}): the file is truncated or not a safetensors file"
    )


def _read_torch_file(path: Path, trust_pickle: bool) -> Any:
    try:
        with warnings.catch_warnings():
            # torch warns about every pickle protocol but 2; whether it could read the file
            # is what the user needs to know, and _refused_pickle says it.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError:
        if not trust_pickle:
            raise _refused_pickle(path) from None
        raise _damaged(path) from None
    except (ModuleNotFoundError, AttributeError) as error:
        # Only a trusted unpickle imports classes; this one names code that is not importable here.
        raise BadInput(
            f"cannot unpickle {path}: {one_line(error)}; run where the model's code is importable, "
            "or save model.state_dict() and pass --factory MOD:FN"
        ) from None
    except (OSError, EOFError, zipfile.BadZipFile):
        # Their messages ("[Errno 22] Invalid argument", "Ran out of input") say nothing more.
        raise _damaged(path) from None
    except (RuntimeError, ValueError) as error:
        raise _damaged(path, one_line(error)) from None
    except (IndexError, KeyError, TypeError, UnicodeDecodeError):
        # A file that is no pickle at all (text, say) trips torch's unpickler in odd ways.
        raise _damaged(path) from None


def _damaged(path: Path, detail: str | None = None) -> BadInput:
    detail = f" ({detail})" if detail else ""
    return BadInput(
        f"cannot read {path} as a PyTorch checkpoint{detail}: the file is truncated or not a torch.save file"
    )


def _refused_pickle(path: Path) -> BadInput:
    """Why ``torch.load(weights_only=True)`` refused ``path``: a pickled object, a protocol it cannot read, or damage.

    The pickle is parsed, never run: naming the class costs no trust.
    """
    parsed = _parse_torch_pickle(path)
    if parsed is None:
        return _damaged(path)
    protocol, names = parsed
    # The first class the pickle imports is the outermost object's: the model, for torch.save(model).
    refused = [name for name in names if not _is_safe_global(name)]
    if refused:
        return BadInput(
            f"{path} holds a pickled {refused[0]} (a whole object, not a state dict); it was not loaded because "
            "unpickling runs arbitrary code. If you trust the file, pass --trust-pickle; safer, save "
            "model.state_dict() and pass --factory MOD:FN"
        )
    if protocol > 3:
        return BadInput(
            f"{path} was saved with pickle protocol {protocol}, which torch.load(weights_only=True) cannot read; "
            "save it again with torch.save and the default protocol"
        )
    return _damaged(path)


def _parse_torch_pickle(path: Path) -> tuple[int, list[str]] | None:
    """The pickle protocol of a torch.save (zip) file and the globals it imports, in order; None if unreadable."""
    try:
        with zipfile.ZipFile(path) as archive:
            data = archive.read(next(n for n in archive.namelist() if n.rsplit("/", 1)[-1] == "data.pkl"))
        return _pickle_globals(data)
    except Exception:  # noqa: BLE001 - damaged or not a zip-format torch file: nothing to name
        return None


def _pickle_globals(data: bytes) -> tuple[int, list[str]]:
    """Protocol and ``module.name`` of each global a pickle imports (``pickletools`` parses, never runs)."""
    protocol, names, strings, memo = 0, [], [], {}
    last: str | None = None
    for opcode, argument, _ in pickletools.genops(data):
        pushed = None
        if opcode.name == "PROTO":
            protocol = int(argument)
        elif opcode.name == "GLOBAL":
            names.append(str(argument).replace(" ", ".", 1).replace("__builtin__.", "builtins.", 1))
        elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
            names.append(f"{strings[-2]}.{strings[-1]}")
        elif opcode.name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
            memo[len(memo) if opcode.name == "MEMOIZE" else argument] = last
            continue  # stores the top of the stack, pushes nothing
        elif opcode.name in ("GET", "BINGET", "LONG_BINGET"):
            pushed = memo.get(argument)
        elif isinstance(argument, str) and "UNICODE" in opcode.name:
            pushed = argument
        if isinstance(pushed, str):
            strings.append(pushed)
        last = pushed
    return protocol, names


def _is_safe_global(name: str) -> bool:
    """Whether ``torch.load(weights_only=True)`` would import ``name`` (tensor rebuilding, containers)."""
    return name in _safe_global_names() or name.startswith("torch._utils.") or name.endswith("Storage")


@functools.cache
def _safe_global_names() -> frozenset[str]:
    try:  # private, but the very list torch checks; the fallback in _is_safe_global covers its absence
        from torch._weights_only_unpickler import _get_allowed_globals

        names = set(_get_allowed_globals())
    except Exception:  # noqa: BLE001
        names = {"collections.OrderedDict", "torch.Size", "torch.device", "torch.nn.parameter.Parameter"}
    for entry in torch.serialization.get_safe_globals():
        target = entry[0] if isinstance(entry, tuple) else entry
        names.add(f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', '')}")
    return frozenset(names)


def _find_state_dict(content: Any, path: Path, key: str | None) -> dict[str, Tensor]:
    if not isinstance(content, Mapping):
        raise BadInput(f"{path} is not a checkpoint: it holds a {type(content).__name__}, not a state dict")
    if not content:
        raise BadInput(f"{path} is not a checkpoint: it holds an empty dict")
    if key is not None:
        if key not in content:
            raise BadInput(f"{path} has no key {key!r}; its keys: {listing(map(str, content))}")
        content = content[key]
    elif not _is_state_dict(content):
        found = next((k for k in NESTED_STATE_DICT_KEYS if k in content and _holds_weights(content[k])), None)
        if found is None:
            raise BadInput(
                f"{path} is not a state dict and none of its keys ({listing(map(str, content))}) holds one; "
                "pass --key NAME to say where the weights are"
            )
        content = content[found]
    if isinstance(content, nn.Module):
        return content  # type: ignore[return-value]
    if not _is_state_dict(content):
        raise BadInput(f"{path}: {key!r} does not hold a state dict of tensors")
    return _strip_wrapper_prefixes(dict(content))


def _holds_weights(value: Any) -> bool:
    # A module only arrives here from a trusted unpickle ({"model": model, "epoch": 3}).
    return _is_state_dict(value) or isinstance(value, nn.Module)


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
    # torch fills in a missing BN num_batches_tracked (checkpoints from before it existed,
    # exporters that drop it) with 0: not worth refusing a file for.
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    misshapen = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {listing(unexpected)}")
    if misshapen:
        problems.append(f"shape mismatches (file vs model): {listing(misshapen)}")
    if problems:
        raise BadInput(
            f"{source} does not fit the factory's model: "
            + "; ".join(problems)
            + ". Is --factory the right architecture?"
        )
    _take_dtypes(model, state_dict)
    model.load_state_dict(state_dict, strict=True)


def _take_dtypes(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Give each floating parameter and buffer of ``model`` the dtype the checkpoint stores it in.

    A factory builds float32; a float16 checkpoint must stay float16 through convert and
    revert (loading would otherwise widen it, and the file written would double in size).
    """
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        stored = state_dict.get(name)
        if stored is None or not (stored.is_floating_point() and tensor.is_floating_point()):
            continue
        if stored.dtype != tensor.dtype:
            module_name, _, attribute = name.rpartition(".")
            module = model.get_submodule(module_name)
            if attribute in module._parameters:
                module._parameters[attribute].data = tensor.data.to(stored.dtype)
            else:
                module._buffers[attribute] = tensor.to(stored.dtype)


# ------------------------------------------------------------------------------- writing


def check_writable(path: Path, *, force: bool) -> None:
    """Fail early, before any work, if ``path`` cannot be written."""
    if path.is_dir():
        raise BadInput(f"{path} is a directory; name the output file, e.g. {path / 'model.syncbn.safetensors'}")
    if path.exists() and not path.is_file():
        raise BadInput(f"{path} exists and is not a file")
    if path.exists() and not force:
        raise BadInput(f"{path} exists; pass --force to overwrite it")
    if not path.parent.is_dir():
        raise BadInput(f"cannot write {path}: directory {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise BadInput(f"cannot write {path}: directory {path.parent} is not writable")


def save_weights(state_dict: Mapping[str, Tensor], path: Path, metadata: Mapping[str, Any], *, force: bool) -> None:
    """Write ``state_dict`` to ``path`` atomically: safetensors (metadata under "syncbn"), or .pt.

    Safetensors needs contiguous tensors that share no storage, so each is copied. The
    file is written beside ``path`` under a temporary name and renamed into place, so a
    failure leaves neither a partial file nor the temporary one.
    """
    check_writable(path, force=force)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    # A new file gets the mode the umask gives; an overwritten one keeps its own.
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o666 & ~_umask()
    try:
        handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise BadInput(f"cannot write {path}: {error.strerror or error}") from None
    os.close(handle)
    try:
        if path.suffix == ".safetensors":
            save_file(tensors, temp_name, metadata={"format": "pt", "syncbn": json.dumps(dict(metadata))})
        else:
            torch.save(tensors, temp_name)
        os.chmod(temp_name, mode)
        os.replace(temp_name, path)
    except (OSError, SafetensorError, RuntimeError) as error:
        # Disk full, quota, I/O errors: safetensors and torch.save raise their own types for them.
        Path(temp_name).unlink(missing_ok=True)
        reason = error.strerror if isinstance(error, OSError) and error.strerror else one_line(error)
        raise BadInput(f"cannot write {path}: {reason}; no file written") from None
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask (read by setting it, the only portable way, and setting it back)."""
    current = os.umask(0o022)
    os.umask(current)
    return current


def read_syncbn_metadata(path: Path) -> dict[str, Any] | None:
    """The metadata ``save_weights`` recorded in a safetensors file, or None."""
    try:
        with safe_open(str(path), "pt") as handle:
            raw = (handle.metadata() or {}).get("syncbn")
    except (SafetensorError, OSError) as error:
        raise _unreadable_safetensors(path, error) from None
    if not raw:
        return None
    try:
        metadata = json.loads(raw)
    except ValueError:
        return None  # someone else's "syncbn" entry: not ours to interpret
    return metadata if isinstance(metadata, dict) else None


def qualified_class_name(model: nn.Module) -> str:
    """``module.Class`` of ``model``, as a pickle or a log names it.

    Example:
        >>> qualified_class_name(nn.BatchNorm2d(3))
        'torch.nn.modules.batchnorm.BatchNorm2d'
    """
    return f"{type(model).__module__}.{type(model).__qualname__}"
