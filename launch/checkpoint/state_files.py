"""A training state (nested dicts, lists and tuples of tensors, numbers, strings) written as one JSON
file plus one safetensors file, and read back without unpickling anything.

Why not `torch.save`: its format is a pickle, and unpickling a file runs whatever code the file
names. A checkpoint gets copied between machines and people, so a file someone handed you must never
be able to run code. Here the tensors go to safetensors (a JSON header plus raw bytes) and
everything else to plain JSON, where every value is data:

    {"$": "tensor", "key": "t17"}                 a tensor, stored under key "t17" in the safetensors file
    {"$": "tuple", "items": [...]}                 a tuple (JSON only has lists)
    {"$": "dict", "items": [[key, value], ...]}   a dict whose keys are not all strings (optimizer state by index)
    {"$": "float", "value": "nan"}                 a non-finite float (not valid JSON otherwise)
    {"$": "dtype", "name": "bfloat16"}             a torch.dtype (Muon's ns_dtype)
    {"$": "ndarray", "dtype": "uint32", "shape": [...], "values": [...]}   numpy's RNG state
    {"$": "object", "class": "deepspeed...LossScaler", "fields": {...}}     one of ALLOWED_OBJECTS

A sharded checkpoint's pieces go into the same safetensors file under their own names (prefix
NAMED_PREFIX, listed in the JSON's "named"), each read alone with `read_slice`.

A dict with only string keys (and no key "$") is written as a JSON object. DeepSpeed's ZeRO
optimizers put a few small objects in their state (a loss scaler, an enum, slice addresses); those
classes are named in ALLOWED_OBJECTS and rebuilt from their fields without calling any code of the
file's choosing. Any other type fails at save time, naming where in the state it sits, so nothing is
ever silently pickled.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import importlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

# Classes a state may hold besides plain data: qualified name -> how its fields are kept.
# "vars": the instance's __dict__; "dataclass": its fields; "enum": its value.
ALLOWED_OBJECTS = {
    "deepspeed.runtime.fp16.loss_scaler.LossScaler": "vars",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler": "vars",
    "deepspeed.runtime.zero.config.ZeroStageEnum": "enum",
    "deepspeed.utils.tensor_fragment.fragment_address": "dataclass",
}
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2)}
_NP_DTYPES = {"uint32", "int64", "int32", "float64", "float32", "uint8", "bool"}


NAMED_PREFIX = "named:"  # never collides with the encoder's t0, t1, ...


class StateFormatError(ValueError):
    """A state file that does not hold what this module writes; the message says where and what."""


def _qualname(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class _Encoder:
    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}
        self._views: dict[tuple, str] = {}  # one key per distinct view (tied weights are stored once)
        self._storages: set[int] = set()

    def tensor(self, t: torch.Tensor) -> dict:
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if view[0] != 0 and view in self._views:
            return {"$": "tensor", "key": self._views[view]}
        whole = t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()
        # safetensors refuses two tensors over one storage, and a view would write its whole storage.
        if not whole or view[0] in self._storages:
            t = t.clone(memory_format=torch.contiguous_format)
        self._storages.add(t.untyped_storage().data_ptr())
        key = f"t{len(self.tensors)}"
        self.tensors[key] = t
        if view[0] != 0:
            self._views[view] = key
        return {"$": "tensor", "key": key}

    def __call__(self, value, where: str):
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int) and not isinstance(value, enum.Enum):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {"$": "float", "value": repr(value)}
        if isinstance(value, torch.Tensor):
            return self.tensor(value)
        if isinstance(value, torch.dtype):
            return {"$": "dtype", "name": str(value).removeprefix("torch.")}
        if isinstance(value, np.ndarray):
            if str(value.dtype) not in _NP_DTYPES:
                raise TypeError(f"{where}: numpy array of dtype {value.dtype} cannot be stored")
            return {"$": "ndarray", "dtype": str(value.dtype), "shape": list(value.shape), "values": value.ravel().tolist()}
        if isinstance(value, np.generic):
            return self(value.item(), where)
        if isinstance(value, (list, tuple)) and type(value) in (list, tuple, torch.Size):
            items = [self(v, f"{where}[{i}]") for i, v in enumerate(value)]
            return items if type(value) is list else {"$": "tuple", "items": items}
        if type(value) in (dict, collections.OrderedDict):  # state_dict()s are OrderedDicts; order is kept
            if all(isinstance(k, str) for k in value) and "$" not in value:
                return {k: self(v, f"{where}.{k}") for k, v in value.items()}
            return {"$": "dict", "items": [[self(k, f"{where} key"), self(v, f"{where}[{k!r}]")] for k, v in value.items()]}
        name = _qualname(type(value))
        kind = ALLOWED_OBJECTS.get(name)
        if kind == "enum":
            return {"$": "object", "class": name, "value": self(value.value, f"{where}.value")}
        if kind == "dataclass":
            fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
            return {"$": "object", "class": name, "fields": self(fields, where)}
        if kind == "vars":
            return {"$": "object", "class": name, "fields": self(dict(vars(value)), where)}
        raise TypeError(
            f"{where}: a {name} cannot be stored in a checkpoint (plain data, tensors and "
            f"launch.checkpoint.state_files.ALLOWED_OBJECTS only); convert it to plain data in the state_dict that returns it"
        )


class _Decoder:
    def __init__(self, tensors: dict[str, torch.Tensor], source: str):
        self.tensors, self.source = tensors, source
        self.used: set[str] = set()

    def fail(self, where: str, what: str):
        raise StateFormatError(f"{self.source}: {where or 'top level'}: {what}")

    def __call__(self, value, where: str = ""):
        if value is None or isinstance(value, (bool, str, int, float)):
            return value
        if isinstance(value, list):
            return [self(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if not isinstance(value, dict):
            self.fail(where, f"unexpected JSON value {value!r}")
        tag = value.get("$")
        if tag is None:
            return {k: self(v, f"{where}.{k}") for k, v in value.items()}
        if tag == "tensor":
            key = value.get("key")
            if key not in self.tensors:
                self.fail(where, f"refers to tensor {key!r}, which the tensor file does not hold")
            self.used.add(key)
            return self.tensors[key]
        if tag == "tuple":
            return tuple(self(v, f"{where}[{i}]") for i, v in enumerate(self._list(value, "items", where)))
        if tag == "dict":
            out = {}
            for i, pair in enumerate(self._list(value, "items", where)):
                if not (isinstance(pair, list) and len(pair) == 2):
                    self.fail(where, f"dict item {i} is not a [key, value] pair")
                key = self(pair[0], f"{where} key {i}")
                if not isinstance(key, (str, int, float, bool, tuple)) and key is not None:
                    self.fail(where, f"dict key {key!r} is not hashable plain data")
                out[key] = self(pair[1], f"{where}[{key!r}]")
            return out
        if tag == "float":
            if value.get("value") not in ("nan", "inf", "-inf"):
                self.fail(where, f"float {value.get('value')!r} is not nan, inf or -inf")
            return float(value["value"])
        if tag == "dtype":
            if value.get("name") not in _DTYPES:
                self.fail(where, f"unknown dtype {value.get('name')!r}")
            return _DTYPES[value["name"]]
        if tag == "ndarray":
            if value.get("dtype") not in _NP_DTYPES:
                self.fail(where, f"numpy dtype {value.get('dtype')!r} is not one of {sorted(_NP_DTYPES)}")
            try:
                return np.array(self._list(value, "values", where), dtype=value["dtype"]).reshape(value["shape"])
            except (TypeError, ValueError, KeyError) as err:
                self.fail(where, f"malformed numpy array ({err})")
        if tag == "object":
            return self._object(value, where)
        self.fail(where, f"unknown tag {tag!r}")

    def _list(self, value: dict, key: str, where: str) -> list:
        items = value.get(key)
        if not isinstance(items, list):
            self.fail(where, f"{value.get('$')} without a list {key!r}")
        return items

    def _object(self, value: dict, where: str):
        name = value.get("class")
        kind = ALLOWED_OBJECTS.get(name)
        if kind is None:
            self.fail(where, f"class {name!r} is not one a checkpoint may hold (launch.checkpoint.state_files.ALLOWED_OBJECTS)")
        module, _, attr = name.rpartition(".")
        cls = getattr(importlib.import_module(module), attr)
        if kind == "enum":
            try:
                return cls(self(value.get("value"), where))
            except ValueError as err:
                self.fail(where, str(err))
        fields = self(value.get("fields"), where)
        if not isinstance(fields, dict) or not all(isinstance(k, str) for k in fields):
            self.fail(where, f"{name} without a table of fields")
        if kind == "dataclass":
            known = {f.name for f in dataclasses.fields(cls)}
            if set(fields) != known:
                self.fail(where, f"{name} fields {sorted(fields)}, expected {sorted(known)}")
        obj = cls.__new__(cls)  # object.__new__: no constructor of the file's choosing runs
        obj.__dict__.update(fields)
        return obj


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save(state, json_path: Path, tensors_path: Path, named: dict[str, torch.Tensor] | None = None) -> None:
    """Write `state` as `json_path` (its structure and plain values) and `tensors_path` (its tensors),
    both fsynced. `named`: more tensors stored under their own names (a sharded checkpoint's pieces,
    read one at a time with `read_slice`). Raises TypeError naming the first value that is not storable."""
    encoder = _Encoder()
    tree = encoder(state, "state")
    # Copies: pieces are often views into one flat partition, and safetensors refuses shared storage.
    named = {f"{NAMED_PREFIX}{k}": v.detach().to("cpu", copy=True).contiguous() for k, v in (named or {}).items()}
    save_file({**encoder.tensors, **named}, str(tensors_path), metadata={"format": "kimi-moe-state"})
    fd = os.open(tensors_path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    doc = {"format": "kimi-moe-state", "version": 1, "state": tree, "named": sorted(named)}
    _fsync_write(Path(json_path), json.dumps(doc).encode())


def read_tree(json_path: Path) -> dict:
    """The JSON half of a saved state, checked to be ours."""
    try:
        doc = json.loads(Path(json_path).read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise StateFormatError(f"{json_path}: not a state file of ours (not JSON: {err})") from None
    if not isinstance(doc, dict) or doc.get("format") != "kimi-moe-state" or "state" not in doc:
        raise StateFormatError(f"{json_path}: not a state file of ours (no 'format': 'kimi-moe-state')")
    if doc.get("version") != 1:
        raise StateFormatError(f"{json_path}: state format version {doc.get('version')!r}; this code reads version 1")
    return doc["state"]


def load(json_path: Path, tensors_path: Path, only: str | None = None):
    """The state `save` wrote. `only`: read just that top-level key (its tensors alone are loaded)."""
    tree = read_tree(json_path)
    if only is not None:
        if not isinstance(tree, dict) or only not in tree:
            raise StateFormatError(f"{json_path}: the state has no {only!r}")
        tree = {only: tree[only]}
    wanted = set(_tensor_keys(tree))
    try:
        with safe_open(str(tensors_path), framework="pt", device="cpu") as f:
            stored = set(f.keys())
            missing = sorted(wanted - stored)
            if missing:
                raise StateFormatError(f"{tensors_path}: lacks tensor(s) {missing[:5]} that {Path(json_path).name} refers to")
            extra = stored - wanted - set(named_keys(json_path))
            if only is None and extra:
                raise StateFormatError(f"{tensors_path}: holds tensor(s) {sorted(extra)[:5]} that "
                                       f"{Path(json_path).name} does not refer to")
            tensors = {k: f.get_tensor(k) for k in wanted}
    except StateFormatError:
        raise
    except Exception as err:  # safetensors raises its own error types for a bad header
        raise StateFormatError(f"{tensors_path}: not a readable safetensors file ({err})") from None
    decoder = _Decoder(tensors, str(json_path))
    state = decoder(tree)
    return state[only] if only is not None else state


def named_keys(json_path: Path) -> list[str]:
    """The names of the tensors `save` stored under their own names (with NAMED_PREFIX)."""
    doc = json.loads(Path(json_path).read_bytes())
    names = doc.get("named", [])
    if not (isinstance(names, list) and all(isinstance(n, str) and n.startswith(NAMED_PREFIX) for n in names)):
        raise StateFormatError(f"{json_path}: 'named' is not a list of {NAMED_PREFIX}* tensor names")
    return names


def read_slice(handle, tensors_path: Path, name: str, lo: int, hi: int) -> torch.Tensor:
    """Elements [lo, hi) of the 1-D tensor `save` stored as `named[name]`, read without the rest of
    the file; `handle` is `safe_open(tensors_path)`."""
    key = f"{NAMED_PREFIX}{name}"
    try:
        piece = handle.get_slice(key)
        shape = piece.get_shape()
    except Exception as err:  # safetensors' own error types
        raise StateFormatError(f"{tensors_path}: no readable tensor {key!r} ({err})") from None
    if len(shape) != 1 or not 0 <= lo <= hi <= shape[0]:
        raise StateFormatError(f"{tensors_path}: tensor {key!r} has shape {shape}; elements [{lo}, {hi}) were wanted")
    return piece[lo:hi]


def _tensor_keys(tree):
    if isinstance(tree, list):
        for v in tree:
            yield from _tensor_keys(v)
    elif isinstance(tree, dict):
        if tree.get("$") == "tensor":
            yield tree.get("key")
        else:
            for v in tree.values():
                yield from _tensor_keys(v)
