"""Where documents come from: the default offline corpus, the user's files, or a cached `datasets` name.

`load_documents(path, text_field, max_bytes, cache_dir)` returns a `Documents`: a `datasets.Dataset`
with one document per row in column `text_field`, and a fingerprint that changes when the documents
do (it keys every cache built from them). Every check on the user's input runs before any file is read.
When `datasets` cannot read a corpus of several files, each is read again on its own so the error
names the one at fault (and, for JSON, its line) instead of "an error occurred while generating".

`path` is read as, in this order:
  None                  the Python standard library's own source, one .py file per document
  a glob (*, ?, [)      every matching file
  a directory           a `save_to_disk` folder, else every .txt/.jsonl/.json/.parquet file below it
  a file                that file
  anything else         a dataset name already in the local `datasets` cache (never downloaded)

A .txt file holds one document per blank-line-separated paragraph; .jsonl/.json/.parquet one per row.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
import tempfile
from dataclasses import dataclass

import datasets

from moe.config import ConfigError

# File extension -> the `datasets` builder that reads it.
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# Directories of the standard library that are not library code: test suites, third-party packages,
# bytecode, and the generated charmap tables of `encodings` (1.4 MB of \uXXXX literals).
STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "encodings"}


@dataclass
class Documents:
    dataset: datasets.Dataset
    text_field: str
    fingerprint: str
    description: str  # for messages: where the documents came from


def load_documents(path: str | None, text_field: str, max_bytes: int, cache_dir: str) -> Documents:
    if path is None:
        return stdlib_documents(max_bytes)
    source = resolve(path)
    if source[0] == "name":
        ds, description = _cached_dataset(path), f"cached dataset {path!r}"
    elif source[0] == "saved":
        ds, description = _saved_dataset(source[1]), f"saved dataset {path!r}"
    else:
        builder, files = source
        # .txt: a paragraph per document, so a single book still splits into train and validation.
        kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
        description = f"data.path = {path!r} ({len(files)} {builder} file{'s' * (len(files) > 1)})"
        ds = _load_files(builder, files, os.path.join(cache_dir, "datasets"), description, **kwargs)
    if source[0] == "text":
        text_field = "text"  # the text builder's only column; data.text_field applies to the other formats
    if text_field not in ds.column_names:
        raise ConfigError(
            f"data.text_field = {text_field!r} is not a column of {description}; columns: {', '.join(ds.column_names)}"
        )
    if not _is_string(ds.features[text_field]):
        raise ConfigError(
            f"data.text_field = {text_field!r} in {description} holds {ds.features[text_field]}, not strings"
        )
    ds = ds.select_columns([text_field])
    return Documents(ds, text_field, _fingerprint_of_cache_files(ds, text_field), description)


def resolve(path: str) -> tuple[str, list[str] | str]:
    """Classify `path` without reading any data: ("text"|"json"|"parquet", files), ("saved", dir) or ("name", path)."""
    expanded = os.path.expanduser(path)
    if any(c in expanded for c in "*?["):
        files = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
        if not files:
            raise ConfigError(f"data.path = {path!r} matches no files")
    elif os.path.isdir(expanded):
        if os.path.exists(os.path.join(expanded, "state.json")) or os.path.exists(os.path.join(expanded, "dataset_dict.json")):
            return "saved", expanded
        files = sorted(
            os.path.join(d, f)
            for d, _, names in os.walk(expanded)
            for f in names
            if os.path.splitext(f)[1].lower() in BUILDERS
        )
        if not files:
            raise ConfigError(f"data.path = {path!r} is a directory with no {'/'.join(BUILDERS)} files in it")
    elif os.path.isfile(expanded):
        files = [expanded]
    elif os.path.splitext(expanded)[1] or expanded.startswith((".", "/", "~")) or path.count("/") > 1:
        # Looks like a path (hub names are "name" or "owner/name" with no extension): say it is missing.
        raise ConfigError(f"data.path = {path!r} does not exist")
    else:
        return "name", path
    nonempty = [f for f in files if os.path.getsize(f) > 0]  # `datasets` fails on a zero-byte file
    if not nonempty:
        raise ConfigError(f"data.path = {path!r}: the corpus is empty ({len(files)} file{'s' * (len(files) > 1)} of 0 bytes)")
    files = nonempty
    kinds = {}
    for f in files:
        ext = os.path.splitext(f)[1].lower()
        if ext not in BUILDERS:
            raise ConfigError(
                f"data.path = {path!r}: file {f!r} has unsupported format {ext or '(no extension)'!r}; "
                f"supported: {', '.join(BUILDERS)}"
            )
        kinds.setdefault(BUILDERS[ext], f)
    if len(kinds) > 1:
        examples = ", ".join(f"{k} ({f})" for k, f in kinds.items())
        raise ConfigError(f"data.path = {path!r} mixes file formats: {examples}; point it at one format")
    return next(iter(kinds)), files


def stdlib_files(max_bytes: int) -> list[tuple[str, str]]:
    """(relative path, absolute path) of the standard library's .py files, sorted, until max_bytes."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in STDLIB_SKIP]
        for name in names:
            if name.endswith(".py"):
                full = os.path.join(folder, name)
                found.append((os.path.relpath(full, root), full))
    chosen, total = [], 0
    for rel, full in sorted(found):
        size = os.path.getsize(full)
        if total + size > max_bytes:
            break  # stop, not skip: the corpus stays a prefix of the sorted list
        chosen.append((rel, full))
        total += size
    return chosen


def stdlib_documents(max_bytes: int) -> Documents:
    files = stdlib_files(max_bytes)
    if not files:
        raise ConfigError(f"data.max_bytes = {max_bytes} is smaller than the first standard-library file; raise it")
    digest = hashlib.sha256()
    texts = []
    for rel, full in files:
        with open(full, "rb") as fh:
            raw = fh.read()
        digest.update(rel.encode() + b"\0" + raw + b"\0")
        texts.append(raw.decode("utf-8", errors="replace"))
    ds = datasets.Dataset.from_dict({"text": texts})
    return Documents(ds, "text", "stdlib-" + digest.hexdigest()[:16], f"Python standard library ({len(files)} files)")


def _load_files(builder: str, files: list[str], cache_dir: str, description: str, **kwargs) -> datasets.Dataset:
    try:
        return _load(builder, files, cache_dir, kwargs)
    # ValueError (pyarrow's ArrowInvalid among them): the first file, read to infer the schema, is broken.
    except (datasets.exceptions.DatasetGenerationError, ValueError) as err:
        if _holds_no_rows(err):
            raise ConfigError(f"{description} holds 0 documents; need >= 2 to hold one out") from None
        # `datasets` does not say which file failed, so with several files each is read again on its own.
        why = _file_error(files[0], err) if len(files) == 1 else _find_bad_file(builder, files, kwargs)
        if why is None:
            if not isinstance(err, datasets.exceptions.DatasetGenerationError):
                raise
            why = str(err.__cause__ or err)
        raise ConfigError(f"{description} could not be read: {why}") from err


def _load(builder: str, files: list[str], cache_dir: str, kwargs: dict) -> datasets.Dataset:
    return datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache_dir, **kwargs)


def _holds_no_rows(err: Exception) -> bool:
    return isinstance(err, ValueError) and "corresponds to no data" in str(err)  # datasets' words for 0 rows


def _find_bad_file(builder: str, files: list[str], kwargs: dict) -> str | None:
    """What is wrong with the first of `files` that fails on its own, else with the first whose column
    names, then types, differ from the first file's; None if none does. Read into a scratch cache."""
    read = []  # (file, features) of each file that reads on its own
    with tempfile.TemporaryDirectory() as scratch:
        for f in files:
            try:
                read.append((f, _load(builder, [f], scratch, kwargs).features))
            except (datasets.exceptions.DatasetGenerationError, ValueError) as err:
                if not _holds_no_rows(err):  # an empty file is fine among others
                    return _file_error(f, err)
    # Names first: `datasets` casts a column to the first file's type when it can, so a type that differs
    # is the culprit only when no file lacks or adds a column.
    for differ in (lambda a, b: set(a) != set(b), lambda a, b: a != b):
        for f, features in read[1:]:
            if differ(features, read[0][1]):
                return (f"file {f!r} has columns {_columns(features)} but file {read[0][0]!r} has "
                        f"{_columns(read[0][1])}; every file needs the same columns")
    return None


def _file_error(path: str, err: Exception) -> str:
    where = _json_error_line(path) if path.lower().endswith((".json", ".jsonl")) else None
    return f"file {path!r}, {where}" if where else f"file {path!r}: {err.__cause__ or err}"


def _json_error_line(path: str) -> str | None:
    """'line N: why' for the first line of JSON lines in `path` that is not a JSON object (or for the
    syntax error of a .json document), else None. Bytes, so lines end at b"\n" as in `datasets`."""
    with open(path, "rb") as fh:
        if path.lower().endswith(".json"):
            raw = fh.read()
            try:
                json.loads(raw)
                return None  # one valid document: its shape, not its syntax, is what `datasets` refused
            except json.JSONDecodeError as e:
                if e.msg != "Extra data":  # "Extra data" after the first value: JSON lines
                    return f"line {e.lineno}: {e.msg} (column {e.colno})"
            except ValueError as e:
                return f"not UTF-8: {e}"
            lines = raw.split(b"\n")
        else:
            lines = fh
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip(b"\r\n"))  # so a line cut short reports its own last column
            except json.JSONDecodeError as e:
                return f"line {n}: {e.msg} (column {e.colno})"
            except ValueError as e:
                return f"line {n}: not UTF-8: {e}"
            if not isinstance(row, dict):
                return f"line {n}: a JSON {type(row).__name__}, not an object"
    return None


def _columns(features: datasets.Features) -> str:
    return ", ".join(f"{name}: {feature}" for name, feature in features.items())


def _cached_dataset(name: str) -> datasets.Dataset:
    # The `cache` builder reads what an earlier load_dataset(name) left in the datasets cache and never
    # touches the network; load_dataset(name) itself would retry the Hub for ~25 s before falling back.
    from datasets.packaged_modules.cache.cache import Cache

    try:
        builder = Cache(
            cache_dir=datasets.config.HF_DATASETS_CACHE, repo_id=name, dataset_name=name.split("/")[-1],
            version="auto", hash="auto",
        )
        builder.download_and_prepare()
        ds = builder.as_dataset(split="train")
    except (ValueError, FileNotFoundError, KeyError) as err:
        raise ConfigError(
            f"data.path = {name!r} is not a file, directory or glob, and no dataset of that name with a "
            f"'train' split is in the local datasets cache ({datasets.config.HF_DATASETS_CACHE}): {err}"
        ) from None
    return ds


def _saved_dataset(folder: str) -> datasets.Dataset:
    ds = datasets.load_from_disk(folder)
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ConfigError(f"data.path = {folder!r} is a saved DatasetDict without a 'train' split: {list(ds)}")
        ds = ds["train"]
    return ds


def _is_string(feature) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def _fingerprint_of_cache_files(ds: datasets.Dataset, text_field: str) -> str:
    # The builder's cache path already hashes its data files (paths and mtimes); size and mtime of the
    # Arrow files themselves cover a saved dataset rewritten in place.
    entries = []
    for f in ds.cache_files:
        stat = os.stat(f["filename"])
        entries.append((f["filename"], stat.st_size, stat.st_mtime_ns))
    blob = json.dumps([sorted(entries), text_field]).encode()
    return "data-" + hashlib.sha256(blob).hexdigest()[:16]
