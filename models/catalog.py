"""The model catalog: which models this server answers for, and where their parts live.

A catalog is a TOML file with one `[[model]]` table per served model::

    [[model]]
    name = "huggingfacetb/smollm2-135m-instruct"   # owner/name, as clients call it
    backend = "ctranslate2"                         # or "onnxruntime"
    weights = "{data_dir}/models/smollm2-135m-instruct"
    schema = "huggingfacetb__smollm2-135m-instruct.json"   # file in schemas/ (or a path)
    description = "..."
    extra_versions = ["5fe0a3d7..."]                # more version ids this entry answers to
    max_prediction_time = 600                       # seconds; a longer prediction is canceled
    [model.settings]                                # backend settings, see each backend
    device = "auto"

Relative paths are taken from the catalog file's folder; `{data_dir}` is the server's data
directory. An entry's own version id is the sha256 of its name, its schema and its weights manifest
(file names, sizes and the small JSON files), so it changes exactly when one of them does.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import cattrs

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMAS_DIR = REPO_ROOT / "schemas"
DEFAULT_CATALOG = Path(__file__).resolve().parent / "catalog.toml"

BACKENDS = ("ctranslate2", "onnxruntime")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*/[a-z0-9][a-z0-9._-]*$")
_VERSION = re.compile(r"^[0-9a-f]{64}$")


class CatalogError(Exception):
    """The catalog file is wrong; the message says where."""


@attrs.frozen(kw_only=True)
class _EntrySpec:
    """One `[[model]]` table as written in the file (structured by cattrs)."""

    name: str
    backend: str
    weights: str
    schema: str
    description: str = ""
    extra_versions: list[str] = attrs.field(factory=list)
    max_prediction_time: float | None = None
    settings: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class ModelSchema:
    """The `Input` and `Output` JSON Schemas of a model (Cog's `components.schemas`)."""

    input: dict[str, Any]
    output: dict[str, Any]

    @property
    def output_is_iterator(self) -> bool:
        return self.output.get("x-cog-array-type") == "iterator"


@attrs.frozen(kw_only=True)
class ModelEntry:
    owner: str
    name: str
    backend: str
    weights: Path
    schema: ModelSchema
    description: str
    version_id: str
    extra_versions: tuple[str, ...]
    settings: Mapping[str, Any]
    created_at: datetime
    #: Seconds after which a prediction of this model is canceled; None = no limit.
    max_prediction_time: float | None = None

    @property
    def ref(self) -> str:
        return f"{self.owner}/{self.name}"

    @property
    def version_ids(self) -> tuple[str, ...]:
        return (self.version_id, *self.extra_versions)


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CatalogError(f"cannot read schema file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise CatalogError(f"schema file {path} is not a JSON object")
    return data


def load_schema(path: Path) -> ModelSchema:
    data = _load_json(path)
    try:
        return ModelSchema(input=data["Input"], output=data["Output"])
    except KeyError as exc:
        raise CatalogError(f"schema file {path} has no {exc.args[0]!r} object") from exc


def weights_manifest(weights: Path) -> list[Any]:
    """What identifies a weights directory without reading gigabytes: names, sizes, small JSON."""
    if not weights.is_dir():
        return ["missing", str(weights)]
    manifest: list[Any] = []
    for path in sorted(p for p in weights.rglob("*") if p.is_file()):
        rel = path.relative_to(weights).as_posix()
        size = path.stat().st_size
        entry: list[Any] = [rel, size]
        if path.suffix == ".json" and size < 64 * 1024:
            entry.append(hashlib.sha256(path.read_bytes()).hexdigest())
        manifest.append(entry)
    return manifest


def version_id(name: str, schema: ModelSchema, weights: Path) -> str:
    """sha256 of the schema and the weights manifest, and of the model's name: a version
    belongs to one model, as on Replicate, even when two entries share their weights."""
    payload = json.dumps(
        {
            "name": name,
            "input": schema.input,
            "output": schema.output,
            "weights": weights_manifest(weights),
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode()).hexdigest()


class Catalog:
    """The served models, looked up by `owner/name` or by any of their version ids."""

    def __init__(self, entries: list[ModelEntry]) -> None:
        self._by_ref = {e.ref: e for e in entries}
        self._by_version: dict[str, ModelEntry] = {}
        for entry in entries:
            for vid in entry.version_ids:
                other = self._by_version.setdefault(vid, entry)
                if other is not entry:
                    raise CatalogError(f"version {vid} is claimed by {other.ref} and {entry.ref}")

    def __iter__(self) -> Iterator[ModelEntry]:
        return iter(self._by_ref.values())

    def __len__(self) -> int:
        return len(self._by_ref)

    def get(self, owner: str, name: str) -> ModelEntry | None:
        return self._by_ref.get(f"{owner}/{name}".lower())

    def by_version(self, vid: str) -> ModelEntry | None:
        return self._by_version.get(vid.lower())

    def resolve(self, ref: str) -> tuple[ModelEntry, str] | None:
        """Find `<version id>`, `owner/name` or `owner/name:<version id>`; None if unknown.

        Returns the entry and the version id the caller named (the entry's own one when the
        reference names none), so a prediction keeps the id the client used.
        """
        ref = ref.strip()
        if "/" not in ref:
            entry = self.by_version(ref)
            return (entry, ref.lower()) if entry else None
        name, _, vid = ref.partition(":")
        owner, _, model = name.partition("/")
        entry = self.get(owner, model)
        if entry is None:
            return None
        if not vid:
            return entry, entry.version_id
        if vid.lower() not in entry.version_ids:
            return None
        return entry, vid.lower()


def load_catalog(path: Path | None, *, data_dir: Path) -> Catalog:
    """Read and check a catalog file (the built-in one when `path` is None)."""
    path = path or DEFAULT_CATALOG
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CatalogError(f"cannot read catalog {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"catalog {path} is not valid TOML: {exc}") from exc
    tables = raw.get("model", [])
    if not isinstance(tables, list) or not tables:
        raise CatalogError(f"catalog {path} has no [[model]] tables")
    base = path.resolve().parent
    entries = [_entry(spec, i, path, base, data_dir) for i, spec in enumerate(tables)]
    seen: set[str] = set()
    for entry in entries:
        if entry.ref in seen:
            raise CatalogError(f"catalog {path}: {entry.ref} is listed twice")
        seen.add(entry.ref)
    return Catalog(entries)


def _resolve_path(value: str, base: Path, data_dir: Path) -> Path:
    # `{data_dir}` is the server's, taken from where the server runs (a relative --data-dir
    # must not be read from the catalog's folder); other relative paths from the catalog's.
    path = Path(value.replace("{data_dir}", str(data_dir.resolve()))).expanduser()
    return path if path.is_absolute() else (base / path)


def _entry(raw: Any, index: int, path: Path, base: Path, data_dir: Path) -> ModelEntry:
    where = f"catalog {path}, model #{index + 1}"
    try:
        spec = cattrs.structure(raw, _EntrySpec)
    except cattrs.BaseValidationError as exc:
        msgs = "; ".join(cattrs.transform_error(exc))
        raise CatalogError(f"{where}: {msgs}") from exc
    name = spec.name.lower()
    if not _NAME.match(name):
        raise CatalogError(f"{where}: name {spec.name!r} must look like owner/name")
    if spec.backend not in BACKENDS:
        raise CatalogError(f"{where}: backend must be one of {', '.join(BACKENDS)}")
    if spec.max_prediction_time is not None and spec.max_prediction_time <= 0:
        raise CatalogError(f"{where}: max_prediction_time must be a positive number of seconds")
    for vid in spec.extra_versions:
        if not _VERSION.match(vid.lower()):
            raise CatalogError(f"{where}: extra version {vid!r} is not 64 hex digits")
    schema_path = SCHEMAS_DIR / spec.schema
    if not schema_path.exists():
        schema_path = _resolve_path(spec.schema, base, data_dir)
    schema = load_schema(schema_path)
    weights = _resolve_path(spec.weights, base, data_dir)
    owner, _, model = name.partition("/")
    try:
        created = datetime.fromtimestamp(schema_path.stat().st_mtime, UTC)
    except OSError:
        created = datetime.now(UTC)
    return ModelEntry(
        owner=owner,
        name=model,
        backend=spec.backend,
        weights=weights,
        schema=schema,
        description=spec.description or str(schema.input.get("description", "")),
        version_id=version_id(name, schema, weights),
        extra_versions=tuple(v.lower() for v in spec.extra_versions),
        settings=dict(spec.settings),
        created_at=created,
        max_prediction_time=spec.max_prediction_time,
    )
