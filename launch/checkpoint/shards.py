"""A checkpoint's tensors keyed by their names in the single-device model, each written once, in pieces.

Every rank describes what it holds as `Held` pieces: a flat range [lo, hi) of a global tensor (its
shape that of the single-device model's), e.g. `model/layers.1.moe.experts.down_proj` [E, D, F] of
which an expert-parallel rank holds experts [p*L, (p+1)*L), or `optimizer/<name>/exp_avg` of which a
ZeRO rank holds its partition's overlap. Ranks that hold the same range hold the same values
(replicas over data parallelism), so `assign` splits every range among its holders: each element
is written by exactly one rank, and a dense tensor replicated on N ranks costs each 1/N of it.

The manifest's "shards" index says where each piece went:

    {"tensors": {key: {"shape": [...], "dtype": "float32", "pieces": [[rank, lo, hi], ...]}},
     "scalars": {key: {"value": 7, "tensor": false}}}       per-parameter counters (Adam's step)

A piece is stored flat in rank<r>.safetensors under the name `piece_name(key, lo)`; `Reader` reads
any range of any tensor from whichever pieces cover it, slice by slice (`safe_open`), so a rank of
another layout reads only what it needs.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from launch.checkpoint import state_files


class ShardIndexError(ValueError):
    """A shard index or piece that is not what `assign`/`Reader` expect; the message says which."""


@dataclass
class Held:
    """Elements [lo, hi) of the flattened global tensor `key` (of `shape`), as `flat` [hi - lo]."""
    key: str
    shape: tuple[int, ...]
    lo: int
    hi: int
    flat: torch.Tensor


@dataclass
class ShardSet:
    """What one rank holds: tensor pieces and per-tensor scalars {key: value} (numbers, or
    {"value": v, "tensor": True} for a 0-d tensor such as torch.optim.AdamW's step)."""
    held: list[Held]
    scalars: dict


def piece_name(key: str, lo: int) -> str:
    return f"{key}@{lo}"


def describe(shards: ShardSet) -> dict:
    """The metadata of a rank's pieces that `assign` needs (what every rank shares, not the tensors)."""
    return {"held": [[h.key, list(h.shape), str(h.flat.dtype).removeprefix("torch."), h.lo, h.hi] for h in shards.held],
            "scalars": shards.scalars}


def assign(described: list[dict]) -> dict:
    """The shard index for every rank's `describe` output (rank r's at position r): each element of
    each tensor goes to one of the ranks holding it. Every range held by k ranks is cut into k
    near-equal chunks, dealt out from a rotation chosen by the key (small tensors spread over ranks)."""
    held: dict[str, list] = {}
    meta: dict[str, tuple] = {}
    for rank, d in enumerate(described):
        for key, shape, dtype, lo, hi in d["held"]:
            if key in meta and meta[key] != (tuple(shape), dtype):
                raise ShardIndexError(f"{key}: rank {rank} holds it as {shape} {dtype}, another as {list(meta[key][0])} "
                                      f"{meta[key][1]}")
            meta[key] = (tuple(shape), dtype)
            held.setdefault(key, []).append((rank, lo, hi))
    tensors = {}
    for key, ranges in sorted(held.items()):
        numel = math.prod(meta[key][0])
        cuts = sorted({0, numel, *(lo for _, lo, _ in ranges), *(hi for _, _, hi in ranges)})
        pieces = []
        for a, b in zip(cuts, cuts[1:]):
            holders = sorted(r for r, lo, hi in ranges if lo <= a and b <= hi)
            if not holders:
                raise ShardIndexError(f"{key}: no rank holds elements [{a}, {b}) of its {numel}")
            turn = zlib.crc32(key.encode()) % len(holders)
            holders = holders[turn:] + holders[:turn]
            n = len(holders)
            for i, rank in enumerate(holders):
                lo, hi = a + (b - a) * i // n, a + (b - a) * (i + 1) // n
                if lo == hi:
                    continue
                if pieces and pieces[-1][0] == rank and pieces[-1][2] == lo:
                    pieces[-1][2] = hi  # one piece for a rank's adjacent chunks
                else:
                    pieces.append([rank, lo, hi])
        tensors[key] = {"shape": list(meta[key][0]), "dtype": meta[key][1], "pieces": pieces}
    scalars = {}
    for d in described:
        scalars.update(d["scalars"])
    return {"tensors": tensors, "scalars": scalars}


def owned(shards: ShardSet, index: dict, rank: int) -> dict[str, torch.Tensor]:
    """This rank's pieces under `index` as {piece_name: flat tensor}: slices of what it holds."""
    out = {}
    by_key: dict[str, list[Held]] = {}
    for h in shards.held:
        by_key.setdefault(h.key, []).append(h)
    for key, entry in index["tensors"].items():
        for r, lo, hi in entry["pieces"]:
            if r != rank:
                continue
            h = next(h for h in by_key[key] if h.lo <= lo and hi <= h.hi)  # assign gave it a holder's range
            out[piece_name(key, lo)] = h.flat[lo - h.lo:hi - h.lo]
    return out


def _check_index(index, source: str) -> None:
    if not (isinstance(index, dict) and isinstance(index.get("tensors"), dict) and isinstance(index.get("scalars"), dict)):
        raise ShardIndexError(f"{source}: 'shards' is not an index of tensors and scalars")
    for key, entry in index["tensors"].items():
        ok = (isinstance(entry, dict) and isinstance(entry.get("shape"), list)
              and all(isinstance(n, int) and n >= 0 for n in entry["shape"]) and isinstance(entry.get("pieces"), list)
              and all(isinstance(p, list) and len(p) == 3 and all(isinstance(x, int) for x in p) for p in entry["pieces"]))
        if not ok:
            raise ShardIndexError(f"{source}: shard index entry {key!r} is malformed")
        numel, end = math.prod(entry["shape"]), 0
        for _, lo, hi in sorted(entry["pieces"], key=lambda p: p[1]):
            if lo != end or hi <= lo:
                raise ShardIndexError(f"{source}: the pieces of {key!r} do not tile [0, {numel}) (a gap or overlap at {end})")
            end = hi
        if end != numel:
            raise ShardIndexError(f"{source}: the pieces of {key!r} end at {end}, its shape {entry['shape']} has {numel}")


class Reader:
    """Ranges of a sharded checkpoint's tensors, read piece by piece from the rank files that hold them."""

    def __init__(self, ckpt: Path, index: dict, world_size: int, tensor_file, error=ShardIndexError):
        self.error = error  # what a damaged or malformed piece raises (store's CheckpointError)
        try:
            _check_index(index, f"{ckpt}/manifest.json")
        except ShardIndexError as err:
            raise error(str(err)) from None
        self.ckpt, self.index, self.world_size = Path(ckpt), index, world_size
        self._tensor_file = tensor_file  # rank -> its safetensors file name
        self._handles = {}

    def has(self, key: str) -> bool:
        return key in self.index["tensors"]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.index["tensors"][key]["shape"])

    def keys(self, prefix: str) -> list[str]:
        return sorted(k for k in self.index["tensors"] if k.startswith(prefix))

    def scalar_keys(self, prefix: str) -> list[str]:
        return sorted(k for k in self.index["scalars"] if k.startswith(prefix))

    def scalar(self, key: str):
        """(value, was a 0-d tensor) of a saved scalar, or None."""
        entry = self.index["scalars"].get(key)
        if entry is None:
            return None
        if not (isinstance(entry, dict) and isinstance(entry.get("value"), (int, float))):
            raise self.error(f"{self.ckpt}/manifest.json: scalar {key!r} is malformed ({entry!r})")
        return entry["value"], bool(entry.get("tensor"))

    def read(self, key: str, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """Elements [lo, hi) of the flattened tensor `key` (default: all of it), flat."""
        if key not in self.index["tensors"]:
            raise self.error(f"{self.ckpt}: holds no tensor {key!r} (it was saved by another model or optimizer?)")
        entry = self.index["tensors"][key]
        numel = math.prod(entry["shape"])
        hi = numel if hi is None else hi
        if not 0 <= lo <= hi <= numel:
            raise self.error(f"{self.ckpt}: {key}: elements [{lo}, {hi}) wanted of its {numel}")
        parts = []
        for rank, p_lo, p_hi in sorted(entry["pieces"], key=lambda p: p[1]):
            a, b = max(lo, p_lo), min(hi, p_hi)
            if a < b:
                path = self._path(rank)
                try:
                    parts.append(state_files.read_slice(self._handle(rank), path, piece_name(key, p_lo), a - p_lo, b - p_lo))
                except state_files.StateFormatError as err:
                    raise self.error(str(err)) from None
        return torch.cat(parts) if parts else torch.empty(0)

    def full(self, key: str) -> torch.Tensor:
        return self.read(key).view(self.shape(key))

    def _path(self, rank: int) -> Path:
        if not 0 <= rank < self.world_size:
            raise self.error(f"{self.ckpt}/manifest.json: a piece names rank {rank}; the checkpoint has "
                                  f"{self.world_size} rank(s)")
        return self.ckpt / self._tensor_file(rank)

    def _handle(self, rank: int):
        if rank not in self._handles:
            try:
                self._handles[rank] = safe_open(str(self._path(rank)), framework="pt", device="cpu")
            except Exception as err:  # safetensors' own error types for a bad header
                raise self.error(f"{self._path(rank)}: not a readable safetensors file ({err})") from None
        return self._handles[rank]
