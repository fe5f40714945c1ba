"""Where a job reads and writes: a local path or any pyarrow filesystem URI.

`s3://bucket/key`, `gs://bucket/key`, `hdfs://host/path` and `file:///abs/path` go through
`pyarrow.fs.FileSystem.from_uri`, the same resolver Ray Data uses, so options ride in the URI's
query (`s3://bucket/out?endpoint_override=127.0.0.1:9000&scheme=http&region=us-east-1&allow_delayed_open=true`:
an S3-compatible server needs the region named, and `allow_delayed_open` sends a small file in
one PutObject rather than a multipart upload, which some servers answer in a form pyarrow takes
for an error; `check_writable` finds that out before a job starts). The resolved filesystem
object travels with every read, write and checkpoint (Ray pickles it to the workers), so they all
see the same store with the same options. A local path must be on storage every node sees (NFS)
when the job spans several nodes.
"""
from __future__ import annotations

import os
import posixpath
import re
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs

KNOWN_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
CHECKPOINT_SUFFIX = ".checkpoint"
_USERINFO = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@")


def redacted(uri: str) -> str:
    """The URI without `user:secret@` (pyarrow takes S3 keys there), for logs and summaries."""
    return _USERINFO.sub(r"\1***@", uri)


@dataclass(frozen=True)
class Location:
    uri: str  # as the user gave it (messages show `redacted(uri)`)
    filesystem: pafs.FileSystem
    path: str  # on `filesystem`, without scheme or query

    @property
    def is_local(self) -> bool:
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    def info(self) -> pafs.FileInfo:
        return self.filesystem.get_file_info(self.path)

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self.info().type == pafs.FileType.Directory

    def child(self, name: str) -> Location:
        return Location(f"{self.uri.rstrip('/')}/{name}", self.filesystem, posixpath.join(self.path, name))

    def with_suffix(self, suffix: str) -> Location:
        """The sibling `<this path><suffix>`; in a URI the suffix goes before the query, so the
        sibling keeps the scheme, the keys and the options."""
        base, query = (self.uri.split("?", 1) + [""])[:2]
        uri = base.rstrip("/") + suffix + (f"?{query}" if query else "")
        return Location(uri, self.filesystem, self.path.rstrip("/") + suffix)

    def list_files(self, recursive: bool = False) -> list[pafs.FileInfo]:
        """Files under this folder (names starting with '.' or '_' skipped, as Ray Data does)."""
        selector = pafs.FileSelector(self.path, recursive=recursive, allow_not_found=True)
        return sorted((info for info in self.filesystem.get_file_info(selector)
                       if info.type == pafs.FileType.File
                       and not posixpath.basename(info.path).startswith((".", "_"))),
                      key=lambda info: info.path)


def resolve(uri: str) -> Location:
    """A clear error, before any work starts, for a scheme no pyarrow filesystem serves."""
    if not isinstance(uri, str) or not uri:
        raise ValueError(f"expected a path or URI, got {uri!r}")
    if "://" not in uri:
        return Location(uri, pafs.LocalFileSystem(), os.path.abspath(uri))
    scheme = uri.split("://", 1)[0].lower()
    try:
        filesystem, path = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError, OSError) as e:
        if scheme not in KNOWN_SCHEMES:
            raise ValueError(f"unknown URI scheme {scheme!r} in {redacted(uri)!r}: use a local path or "
                             f"one of {', '.join(s + '://' for s in KNOWN_SCHEMES)}") from None
        raise ValueError(f"cannot open {redacted(uri)!r}: {e}") from None
    return Location(uri, filesystem, path)


def checkpoint_location(output: Location) -> Location:
    """Next to the output folder, never inside it: Ray's recovery lists the output folder
    recursively and would take the checkpoint's own files for orphaned output files."""
    return output.with_suffix(CHECKPOINT_SUFFIX)


def check_writable(location: Location, option: str) -> None:
    """One small write and delete under `location`, before any generation: a store that refuses
    the job's writes (keys, endpoint, URI options) fails here in one line naming the option, not
    after every row has been generated. The probe's name starts with '_', which readers skip."""
    probe = posixpath.join(location.path, f"_write-check-{uuid.uuid4().hex[:8]}")
    try:
        if location.is_local:  # object stores have no folders to make (and would get a marker)
            location.filesystem.create_dir(location.path, recursive=True)
        with location.filesystem.open_output_stream(probe) as stream:
            stream.write(b"codefast write check\n")
        location.filesystem.delete_file(probe)
    except (OSError, pa.ArrowException) as e:
        try:  # a write the store did take although the client saw an error
            location.filesystem.delete_file(probe)
        except (OSError, pa.ArrowException):
            pass
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = ""
        if location.uri.lower().startswith("s3://") and "allow_delayed_open" not in location.uri:
            hint = ("; for an S3-compatible server add &region=...&allow_delayed_open=true to the URI "
                    "(small files then go up in one PutObject, no multipart upload)")
        raise ValueError(f"{option} {redacted(location.uri)} is not writable: {message}{hint}") from None
