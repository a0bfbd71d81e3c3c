"""Fetching dataset files over HTTP(S): checksummed, atomic, and never leaving a partial file behind.

A download streams into a temporary file in the destination's own folder (so the final `os.replace` is an
atomic rename on the same filesystem), hashes the bytes as they arrive, and only renames the file into
place once its length and checksum are right. Any failure removes the temporary file, so a later run never
mistakes a truncated or corrupted file for a good one.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from vaswani.data.paths import DataError, user_cache_dir
from vaswani.files import temporary_beside

TIMEOUT_S = 60.0
_CHUNK = 1 << 16


@dataclass(frozen=True)
class RemoteFile:
    """Where a dataset file can be downloaded from, and the checksum(s) it must have."""

    url: str
    sha256: str | None = None
    md5: str | None = None


def _file_digests(path: Path) -> dict[str, str]:
    sha256, md5 = hashlib.sha256(), hashlib.md5()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            sha256.update(chunk)
            md5.update(chunk)
    return {"sha256": sha256.hexdigest(), "md5": md5.hexdigest()}


def _checksum_problem(digests: dict[str, str], sha256: str | None, md5: str | None) -> str | None:
    """A description of the first checksum that does not match, or None when all given ones match."""
    for name, expected in (("sha256", sha256), ("md5", md5)):
        if expected is not None and digests[name] != expected.lower():
            return f"{name} is {digests[name]}, expected {expected.lower()}"
    return None


def download(
    url: str, dest: Path, sha256: str | None = None, md5: str | None = None, progress: bool = True
) -> Path:
    """Download `url` to `dest` and return `dest`, verifying the given checksum(s).

    When `dest` already exists and matches the checksum(s), nothing is downloaded; with no checksum given, an
    existing file is trusted as it is. A mismatching existing file is downloaded again. The progress bar goes
    to stderr, sized by Content-Length when the server sends one, and is hidden when `progress` is False or
    stderr is not a terminal.

    Raises DataError, naming the URL, on an HTTP or network error, a body shorter than its Content-Length, or
    a checksum mismatch; in every such case neither `dest` nor a temporary file is left behind.
    """
    dest = Path(dest)
    if dest.is_file() and (
        (sha256 is None and md5 is None) or _checksum_problem(_file_digests(dest), sha256, md5) is None
    ):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temporary_beside(dest, suffix=".part")
    try:
        hashers = {"sha256": hashlib.sha256(), "md5": hashlib.md5()}
        received = 0
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            length_header = response.headers.get("Content-Length")
            expected_len = int(length_header) if length_header and length_header.isdigit() else None
            with tqdm(
                total=expected_len,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=dest.name,
                disable=None if progress else True,
                leave=False,
            ) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    for hasher in hashers.values():
                        hasher.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if expected_len is not None and received < expected_len:
            raise DataError(f"download of {url} was truncated: got {received} of {expected_len} bytes")
        problem = _checksum_problem({k: h.hexdigest() for k, h in hashers.items()}, sha256, md5)
        if problem is not None:
            raise DataError(f"checksum mismatch for {url}: {problem}")
        os.replace(tmp, dest)
    except urllib.error.HTTPError as e:
        raise DataError(f"download of {url} failed: HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise DataError(f"download of {url} failed: {e.reason}") from e
    except http.client.IncompleteRead as e:
        raise DataError(f"download of {url} was truncated: {e.expected} more bytes were expected") from e
    except (http.client.HTTPException, OSError) as e:
        raise DataError(f"download of {url} failed: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def ensure_file(data_dir: Path, relative_path: str, remote: RemoteFile, progress: bool = True) -> Path:
    """The path of a dataset file, downloading it into the user cache when the data directory lacks it.

    `relative_path` is the file's place inside a data directory (e.g. "ag_news/train.csv"). A file present in
    `data_dir` is used as it is: the shared data folders are verified when they are made, and hashing every
    file on every load would cost more than it catches. A missing file is fetched to the same relative path
    under the user cache (see `user_cache_dir`), where a copy downloaded earlier is checked against the
    checksum before it is reused.
    """
    local = Path(data_dir) / relative_path
    if local.is_file():
        return local
    return download(
        remote.url, user_cache_dir() / relative_path, sha256=remote.sha256, md5=remote.md5, progress=progress
    )
