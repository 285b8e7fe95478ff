"""Training state on disk without pickle: tensors in safetensors, everything else in JSON.

`save_tree(tree, stem)` writes `stem.safetensors` (every tensor of `tree`) and `stem.json`
(the rest: the nesting, numbers, strings, and where each tensor goes). `load_tree(stem)`
reads them back. Reading runs no code from the files: safetensors holds raw tensor data, JSON
holds plain values, and the few non-plain objects an optimizer state carries (DeepSpeed's
loss scaler, ZeRO stage, fragment addresses) are rebuilt from their fields, by name, from a
fixed allow-list (`ALLOWED`); any other name is refused.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import json
from pathlib import Path

import torch

# module path of a class -> how its fields come back ("enum": `cls(value)`, "fields": set on a bare instance)
ALLOWED = {
    "deepspeed.runtime.fp16.loss_scaler.LossScaler": "fields",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler": "fields",
    "deepspeed.utils.tensor_fragment.fragment_address": "fields",
    "deepspeed.runtime.zero.config.ZeroStageEnum": "enum",
}


class StateFileError(Exception):
    """A state file that cannot be read back: the message names the file and the reason."""


def _name(obj) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _encode(x, tensors: dict[str, torch.Tensor]):
    if isinstance(x, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = x.detach().to("cpu", copy=True).contiguous()  # a copy: safetensors refuses shared storage
        return {"__tensor__": key}
    if isinstance(x, enum.Enum):
        if ALLOWED.get(_name(x)) != "enum":
            raise TypeError(f"{_name(x)}: not a type a checkpoint may hold (stages/mrsp/state_files.py ALLOWED)")
        return {"__enum__": _name(x), "value": x.value}
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, torch.dtype):
        return {"__dtype__": str(x).removeprefix("torch.")}
    if isinstance(x, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in x):
            return {k: _encode(v, tensors) for k, v in x.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in x.items()]}
    if isinstance(x, list):
        return [_encode(v, tensors) for v in x]
    if isinstance(x, tuple):  # torch.Size included: it comes back as a plain tuple
        return {"__tuple__": [_encode(v, tensors) for v in x]}
    if ALLOWED.get(_name(x)) == "fields":
        fields = ({f.name: getattr(x, f.name) for f in dataclasses.fields(x)} if dataclasses.is_dataclass(x)
                  else dict(vars(x)))
        return {"__object__": _name(x), "fields": _encode(fields, tensors)}
    raise TypeError(f"{_name(x)}: not a type a checkpoint may hold (stages/mrsp/state_files.py ALLOWED)")


def _decode(x, tensors: dict[str, torch.Tensor]):
    if isinstance(x, list):
        return [_decode(v, tensors) for v in x]
    if not isinstance(x, dict):
        return x
    if "__tensor__" in x:
        return tensors[x["__tensor__"]]
    if "__tuple__" in x:
        return tuple(_decode(v, tensors) for v in x["__tuple__"])
    if "__items__" in x:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in x["__items__"]}
    if "__dtype__" in x:
        dtype = getattr(torch, str(x["__dtype__"]), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {x['__dtype__']!r}")
        return dtype
    if "__enum__" in x or "__object__" in x:
        name = x.get("__enum__", x.get("__object__"))
        kind = ALLOWED.get(name)
        if kind is None:
            raise ValueError(f"type {name!r} is not one a checkpoint may hold")
        module, _, qualname = name.rpartition(".")
        cls = getattr(importlib.import_module(module), qualname)
        if kind == "enum":
            return cls(x["value"])
        obj = cls.__new__(cls)  # no constructor runs: the fields are set as they were saved
        for k, v in _decode(x["fields"], tensors).items():
            if not isinstance(k, str) or k.startswith("__"):
                raise ValueError(f"{name}: field {k!r}")
            setattr(obj, k, v)
        return obj
    return {k: _decode(v, tensors) for k, v in x.items()}


def save_tree(tree, stem: Path) -> None:
    """Write `tree` (nested dicts, lists, tuples, tensors, plain values) as `stem.safetensors`
    and `stem.json`."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(tree, tensors)
    save_file(tensors, str(_file(stem, ".safetensors")), metadata={"format": "pt"})
    _file(stem, ".json").write_text(json.dumps(skeleton) + "\n")


def load_tree(stem: Path):
    """The tree `save_tree` wrote at `stem`; `StateFileError` naming the file when it cannot be read."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors_path, json_path = _file(stem, ".safetensors"), _file(stem, ".json")
    for path in (tensors_path, json_path):
        if not path.is_file():
            raise StateFileError(f"{path}: missing")
    try:
        tensors = load_file(str(tensors_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise StateFileError(f"{tensors_path}: not a safetensors file ({_first_line(e)})") from None
    try:
        return _decode(json.loads(json_path.read_text()), tensors)
    except (ValueError, KeyError, TypeError, AttributeError, ImportError, RecursionError) as e:
        raise StateFileError(f"{json_path}: not a state file lvr wrote ({_first_line(e)})") from None


def _file(stem: Path, suffix: str) -> Path:
    return stem.with_name(stem.name + suffix)  # not with_suffix: `optimizer.rank1` keeps its rank


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__
