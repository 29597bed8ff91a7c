"""Student artifacts: a directory with a manifest, crossing from the distiller to the gateway.

Layout::

    <dir>/manifest.json   {"format": "kdgate-student/1", "kind", "route", "version", "created",
                           "files": {"<name>": "<sha256>"}, ...kind-specific keys}
    <dir>/<name>          weights and tables in safe formats (safetensors, .npy, JSON): never pickle

The artifact's checksum is the sha256 of ``manifest.json``; since the manifest lists every file's
sha256, it covers them all. :func:`load_manifest` refuses an artifact whose files do not match.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

FORMAT = "kdgate-student/1"

__all__ = [
    "FORMAT", "ArtifactError", "sha256_file", "write_manifest", "load_manifest", "checksum", "verify_registered",
    "artifact_dir", "new_artifact_dir",
]


def artifact_dir(root: str | Path, route: str, version: int) -> Path:
    """``<root>/<slug>-<id>/v<version>``: the slug keeps the directory readable, the id (a digest of
    the exact route name) keeps ``triage``, ``triage.`` and ``triage:`` apart, and nothing in a route
    name can reach outside ``root``."""
    slug = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in route)[:48].strip("_") or "route"
    digest = hashlib.sha256(route.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return Path(root) / f"{slug}-{digest}" / f"v{int(version)}"


def new_artifact_dir(root: str | Path, route: str, version: int) -> Path:
    """Create an empty artifact directory (0700: it holds what was learned from the route's prompts).
    A directory left by a run that died before registering is replaced."""
    import shutil

    directory = artifact_dir(root, route, version)
    Path(root).mkdir(parents=True, exist_ok=True, mode=0o700)
    if directory.exists():
        shutil.rmtree(directory)
    directory.parent.mkdir(exist_ok=True, mode=0o700)
    directory.mkdir(mode=0o700)
    return directory


class ArtifactError(Exception):
    """An artifact is missing, incomplete, or does not match its checksums."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: str | Path, manifest: dict[str, Any]) -> str:
    """Hash every file in ``directory`` (except the manifest), write the manifest, return its checksum."""
    directory = Path(directory)
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != "manifest.json":
            files[str(path.relative_to(directory))] = sha256_file(path)
    body = {"format": FORMAT, **manifest, "files": files}
    tmp = directory / "manifest.json.tmp"
    tmp.write_text(json.dumps(body, indent=2, sort_keys=True))
    os.replace(tmp, directory / "manifest.json")
    return checksum(directory)


def checksum(directory: str | Path) -> str:
    return sha256_file(Path(directory) / "manifest.json")


def load_manifest(directory: str | Path, *, expected_checksum: str | None = None) -> dict[str, Any]:
    """Read and verify an artifact's manifest. Raises :class:`ArtifactError` on any mismatch."""
    directory = Path(directory)
    mpath = directory / "manifest.json"
    if not mpath.is_file():
        raise ArtifactError(f"No manifest.json in {directory}: the artifact is missing or incomplete.")
    if expected_checksum is not None and sha256_file(mpath) != expected_checksum:
        raise ArtifactError(
            f"The manifest of {directory} does not match the checksum recorded in the registry; "
            "the artifact was modified after it was registered."
        )
    try:
        manifest = json.loads(mpath.read_text())
    except ValueError as exc:
        raise ArtifactError(f"The manifest of {directory} is not valid JSON: {exc}") from exc
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{directory} is not a {FORMAT} artifact (format={manifest.get('format')!r}).")
    for name, digest in manifest.get("files", {}).items():
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"Artifact file {name} is missing from {directory}.")
        if sha256_file(path) != digest:
            raise ArtifactError(f"Artifact file {name} in {directory} is corrupted (checksum mismatch).")
    return manifest


def verify_registered(row: dict[str, Any]) -> None:
    """A registry row's artifact still matches its recorded checksum (raises :class:`ArtifactError`
    otherwise): checked before any version is made live."""
    load_manifest(row["artifact_path"], expected_checksum=row["checksum"])
