"""The JSON every ``--format json`` view writes, described: ``layerfs schema [VIEW]``.

One entry per view: its version, whether it is an array of objects or one object, and each
object's fields with their JSON types (``?`` after a name: present only sometimes). List
views stay top-level arrays, as docker's and podman's do (``jq '.[]'``); object views carry
their version in a ``schemaVersion`` field. A change that removes or retypes a field bumps the
view's version; new fields do not. Times are RFC 3339 in UTC with ``Z`` (and nanoseconds where
the source has them); digests are whole (``sha256:...``); sizes are integer bytes.

IDs, one kind per concept: ``id`` of an image is its config digest (docker's image ID);
``chain_id`` names a layer in the store (its snapshot, shared by images that share the
layer and everything below); ``diff_id`` is the layer's uncompressed tar digest (the image
config's ``rootfs.diff_ids``); ``digest`` of a layer is its blob (the manifest's).
"""

from __future__ import annotations

import json

import click

from layerfs.cli.base import cli, emit, handle_errors
from layerfs.errors import UsageError

STR, INT, BOOL, NUM, ARR, OBJ, NULL = "string", "integer", "boolean", "number", "array", "object", "null"
CHANGE = {"kind": STR, "path": STR}

# view -> (version, "array" | "object", fields); the command that writes it in "command"
VIEWS: dict[str, dict[str, object]] = {
    "images": {"command": "layerfs images --format json", "version": 1, "shape": ARR, "fields": {
        "name": STR, "repository": STR, "tag": STR, "id": STR, "manifest_digest": f"{STR}|{NULL}",
        "created": f"{STR}|{NULL}", "size": INT, "layers": ARR, "labels": OBJ}},
    "images-tree": {"command": "layerfs images --tree --format json", "version": 1, "shape": ARR, "fields": {
        "id": f"{STR}|{NULL}", "size": INT, "virtual_size": INT, "tags": ARR, "children": ARR}},
    "history": {"command": "layerfs history REF --format json", "version": 1, "shape": ARR, "fields": {
        "chain_id": f"{STR}|{NULL}", "diff_id": f"{STR}|{NULL}", "created": f"{STR}|{NULL}", "created_by": STR,
        "size": INT, "comment": STR, "empty_layer": BOOL}},
    "layer-diffs": {"command": "layerfs diff IMAGE --format json", "version": 1, "shape": ARR, "fields": {
        "index": INT, "chain_id": STR, "diff_id": STR, "created_by": STR, "size": INT, "changes": ARR}},
    "changes": {"command": "layerfs diff CONTAINER --format json; layerfs diff REF OTHER --format json",
                "version": 1, "shape": ARR, "fields": CHANGE},
    "comparison": {"command": "layerfs diff REF OTHER --type T --format json", "version": 1, "shape": OBJ,
                   "fields": {"schemaVersion": INT, "image1": STR, "image2": STR, "differ": BOOL, "diffs": ARR}},
    "df": {"command": "layerfs df --format json", "version": 1, "shape": ARR, "fields": {
        "type": STR, "total": INT, "active": INT, "size": INT, "reclaimable": INT}},
    "df-images": {"command": "layerfs df -v --format json", "version": 1, "shape": ARR, "fields": {
        "name": STR, "id": STR, "created": f"{STR}|{NULL}", "size": INT, "shared_size": INT, "unique_size": INT,
        "containers": INT}},
    "ps": {"command": "layerfs ps --format json", "version": 1, "shape": ARR, "fields": {
        "name": STR, "image": STR, "image_id": STR, "created": STR, "mounts": ARR, "size?": INT}},
    "mounts": {"command": "layerfs mounts --format json", "version": 1, "shape": ARR, "fields": {
        "target": STR, "name": STR, "snapshot": STR, "backend": STR, "readonly": BOOL, "pid": f"{INT}|{NULL}"}},
    "fsck": {"command": "layerfs fsck --format json", "version": 1, "shape": OBJ, "fields": {
        "schemaVersion": INT, "clean": BOOL, "findings": ARR}},
    "info": {"command": "layerfs info --format json", "version": 1, "shape": OBJ, "fields": {
        "schemaVersion": INT, "kernel": OBJ, "store": OBJ, "backends": OBJ, "auto": f"{STR}|{NULL}"}},
    "analyze": {"command": "layerfs analyze REF --format json", "version": 1, "shape": OBJ, "fields": {
        "schemaVersion": INT, "name": STR, "id": f"{STR}|{NULL}", "efficiency": NUM, "total_bytes": INT,
        "visible_bytes": INT, "wasted_bytes": INT, "user_bytes": INT, "user_wasted_ratio": NUM,
        "duplicate_bytes": INT, "metadata_only_bytes": INT, "paths": INT, "visible_files": INT, "layers": ARR,
        "wasted_by_directory": ARR, "offenders": ARR, "duplicates": ARR, "rules": ARR, "passed": BOOL}},
    "tree": {"command": "layerfs tree REF --format json", "version": 1, "shape": OBJ, "fields": {
        "schemaVersion": INT, "layer": f"{INT}|{NULL}", "entries": ARR}},
    "inspect": {"command": "layerfs inspect REF", "version": 1, "shape": OBJ, "fields": {
        "schemaVersion": INT, "Name": STR, "Digest": STR, "RepoTags": ARR, "Names": ARR, "Id": STR,
        "Created": f"{STR}|{NULL}", "DockerVersion": f"{STR}|{NULL}", "Labels": f"{OBJ}|{NULL}",
        "Architecture": f"{STR}|{NULL}", "Os": f"{STR}|{NULL}", "Variant?": STR, "Author": f"{STR}|{NULL}",
        "Layers": ARR, "LayersData": ARR, "DiffIDs": ARR, "Env": ARR, "Cmd": f"{ARR}|{NULL}",
        "Entrypoint": f"{ARR}|{NULL}", "WorkingDir": f"{STR}|{NULL}", "User": f"{STR}|{NULL}",
        "ExposedPorts": ARR, "Volumes": ARR, "StopSignal": f"{STR}|{NULL}", "ManifestMediaType": f"{STR}|{NULL}"}},
    "pull": {"command": "layerfs pull REF --format json", "version": 1, "shape": OBJ, "fields": {
        "name": STR, "source": STR, "endpoint": f"{STR}|{NULL}", "manifest_digest": STR, "config_digest": STR,
        "platform": f"{STR}|{NULL}", "fetched_blobs": ARR, "new_layers": ARR, "reused_layers": ARR}},
    "push": {"command": "layerfs push IMAGE --format json", "version": 1, "shape": OBJ, "fields": {
        "source": STR, "destination": STR, "manifest_digest": STR, "manifest_size": INT, "blobs": OBJ}},
}

_PYTHON_TYPES = {STR: (str,), INT: (int,), BOOL: (bool,), NUM: (int, float), ARR: (list,), OBJ: (dict,),
                 NULL: (type(None),)}


def _type_ok(value: object, spec: str) -> bool:
    for t in spec.split("|"):
        if t in (INT, NUM) and isinstance(value, bool):
            continue
        if isinstance(value, _PYTHON_TYPES[t]):
            return True
    return False


def problems(view: str, document: object) -> list[str]:
    """How ``document`` (parsed JSON) departs from the schema of ``view``; [] when it matches."""
    schema = VIEWS[view]
    fields: dict[str, str] = schema["fields"]  # type: ignore[assignment]
    if schema["shape"] == ARR:
        if not isinstance(document, list):
            return [f"{view}: expected an array, got {type(document).__name__}"]
        items = document
    else:
        if not isinstance(document, dict):
            return [f"{view}: expected an object, got {type(document).__name__}"]
        if document.get("schemaVersion") != schema["version"]:
            return [f"{view}: schemaVersion {document.get('schemaVersion')!r}, expected {schema['version']}"]
        items = [document]
    out = []
    for n, item in enumerate(items):
        if not isinstance(item, dict):
            out.append(f"{view}[{n}]: not an object")
            continue
        required = {k for k in fields if not k.endswith("?")}
        known = {k.rstrip("?"): v for k, v in fields.items()}
        out += [f"{view}[{n}]: missing {k}" for k in sorted(required - item.keys())]
        out += [f"{view}[{n}]: unknown field {k}" for k in sorted(item.keys() - known.keys())]
        out += [f"{view}[{n}].{k}: {item[k]!r} is not {known[k]}" for k in sorted(item.keys() & known.keys())
                if not _type_ok(item[k], known[k])]
    return out


@cli.command("schema")
@click.argument("view", required=False, type=click.Choice(sorted(VIEWS)))
@handle_errors
def schema_cmd(view: str | None) -> None:
    """The JSON each --format json view writes: its version, its shape (array or object) and
    every field's type. Without VIEW: all of them, as one JSON object keyed by view."""
    if view is not None and view not in VIEWS:
        raise UsageError(f"schema: no view {view!r}")
    emit(json.dumps(VIEWS[view] if view else VIEWS, indent=2) + "\n")
