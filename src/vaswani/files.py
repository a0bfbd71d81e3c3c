"""Files written whole or not at all: the checkpoint, tokenizer, metrics and results writers share these, so
that a reader (or a crash) never sees half of a file, and a good file is replaced only by a complete one."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def temporary_beside(path: Path, suffix: str = ".tmp") -> tuple[int, Path]:
    """Create a new hidden file `.NAME.<random><suffix>` in `path`'s directory (so that os.replace onto `path`
    is atomic) and return its open descriptor and path. Created with mode 0o666 under the user's umask, not
    tempfile.mkstemp's 0o600, so the file ends up as readable as any other the user writes."""
    temporary = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}"
    return os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), temporary


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` (UTF-8) to `path`: to a temporary file beside it, flushed to disk, then renamed over it.
    Creates the parent directory. Returns the path written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = temporary_beside(path)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path
