"""Identifiers on the wire: session, training-run and sampler ids, and `tinker://` paths.

    session id      a uuid4                                      "9373088b-...-fc07"
    training run    "<session>:train:<model_seq_id>"             (tinker 0.38 derives it so)
    sampler         "<session>:sample:<sampling_session_seq_id>"
    checkpoint      tinker://<run>/weights/<name>                a training checkpoint
                    tinker://<run>/sampler_weights/<name>        a checkpoint saved for sampling
                    tinker://<run>/external_weights/<name>       one exported for download (newer SDKs)
    registry        tinker://<adapter>/sampler_weights/<ref>     revision <ref> of a registry adapter
                    tinker://<adapter>/weights/<ref>             (number, head, serving, a tag or a
                                                                 hash prefix); `serving` follows
                                                                 promote / rollback when sampled

The SDK splits a path into exactly three `/`-separated parts, so neither part may hold `/`.
Registry adapter ids are `<owner>:<name>`; a path whose first part is not a training run is
read as one.
"""
from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

from .errors import bad_request

__all__ = [
    "FOLDERS",
    "WeightsPath",
    "check_checkpoint_name",
    "model_id",
    "new_session_id",
    "parse_checkpoint_id",
    "parse_path",
    "run_session",
    "sampler_id",
    "tinker_path",
]

SCHEME = "tinker://"
# path folder -> checkpoint type (as the REST API names it)
FOLDERS = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}
FOLDER_OF_TYPE = {v: k for k, v in FOLDERS.items()}
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
_RUN = re.compile(r"^([0-9a-f-]{36}):train:(\d{1,9})$")
MAX_PATH_LENGTH = 400


def new_session_id() -> str:
    return str(uuid.uuid4())


def model_id(session_id: str, model_seq_id: int) -> str:
    return f"{session_id}:train:{model_seq_id}"


def sampler_id(session_id: str, seq_id: int) -> str:
    return f"{session_id}:sample:{seq_id}"


def run_session(run_id: str) -> str | None:
    """The session of a training run id, or None when `run_id` is not shaped like one."""
    m = _RUN.match(run_id)
    return m.group(1) if m else None


def check_checkpoint_name(name: object) -> str:
    """A checkpoint name (the last part of its path): 1-100 letters, digits, '_', '.', '-'."""
    if not isinstance(name, str) or not _NAME.match(name) or name in (".", ".."):
        raise bad_request(
            f"checkpoint name {name!r} must be 1-100 letters, digits, '_', '.' or '-' (it ends a tinker:// path)"
        )
    return name


@dataclass(frozen=True)
class WeightsPath:
    """A parsed `tinker://<source>/<folder>/<name>` path."""

    source: str  # a training run id or a registry adapter id
    folder: str  # "weights" | "sampler_weights"
    name: str  # checkpoint name, or a revision reference of a registry adapter

    @property
    def checkpoint_type(self) -> str:
        return FOLDERS[self.folder]

    @property
    def checkpoint_id(self) -> str:
        return f"{self.folder}/{self.name}"

    def __str__(self) -> str:
        return tinker_path(self.source, self.folder, self.name)


def tinker_path(source: str, folder: str, name: str) -> str:
    return f"{SCHEME}{source}/{folder}/{name}"


def parse_path(path: object, what: str = "path") -> WeightsPath:
    """Parses a tinker:// path; a 400 naming `what` when it is not one."""
    if not isinstance(path, str) or not path.startswith(SCHEME) or len(path) > MAX_PATH_LENGTH:
        raise bad_request(f"{what} must be a tinker:// path (tinker://<run>/<weights|sampler_weights>/<name>)")
    parts = path[len(SCHEME):].split("/")
    if len(parts) != 3 or not all(parts):
        raise bad_request(f"{what} {path!r}: expected tinker://<run>/<weights|sampler_weights>/<name>")
    source, folder, name = parts
    if folder not in FOLDERS:
        raise bad_request(f"{what} {path!r}: the middle part must be 'weights', 'sampler_weights' or "
                          "'external_weights'")
    return WeightsPath(source, folder, name)


def parse_checkpoint_id(run_id: str, checkpoint_id: str) -> WeightsPath:
    """The REST form: run id + 'weights/<name>' or 'sampler_weights/<name>'."""
    return parse_path(f"{SCHEME}{run_id}/{checkpoint_id}", "checkpoint")
