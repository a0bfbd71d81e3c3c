"""Where the datasets live on disk, and the one exception raised for data that is missing or malformed.

Search order for the data directory (the first that applies wins):

1. the `data_dir` argument a caller passes;
2. the `VASWANI_DATA` environment variable;
3. `../shared/data` beside the current working directory (a checkout next to a shared data folder);
4. `../shared/data` beside the repository root, for an editable install run from elsewhere;
5. the user cache, `$XDG_CACHE_HOME/vaswani/data` (default `~/.cache/vaswani/data`), created on demand;
   this is also where loaders put the files they download.

An explicit directory (1 or 2) that does not exist is an error rather than a silent fall-through: a typo
there would otherwise send a user to a half-empty cache and a download they did not ask for.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "VASWANI_DATA"


class DataError(ValueError):
    """Missing or malformed data. The message is one line naming the file (or URL) and the problem, so the
    command line can print it without a traceback."""


def user_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/vaswani/data`, or `~/.cache/vaswani/data` when XDG_CACHE_HOME is unset or empty.
    Not created here: callers create it when they write to it."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vaswani" / "data"


def _package_repo_root() -> Path | None:
    """The source checkout holding this package (the folder with pyproject.toml above src/vaswani), or None
    for a regular (non-editable) install where the package sits in site-packages."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "pyproject.toml").is_file() and (parent / "src" / "vaswani").is_dir():
            return parent
    return None


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data directory to read datasets from, following the search order in the module docstring.

    Raises DataError when `data_dir` or `VASWANI_DATA` names a directory that does not exist.
    """
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            raise DataError(f"data directory {path} does not exist")
        return path
    from_env = os.environ.get(ENV_VAR)
    if from_env:
        path = Path(from_env).expanduser()
        if not path.is_dir():
            raise DataError(f"data directory {path} (from ${ENV_VAR}) does not exist")
        return path
    beside_cwd = Path.cwd().parent / "shared" / "data"
    if beside_cwd.is_dir():
        return beside_cwd
    repo_root = _package_repo_root()
    if repo_root is not None and (repo_root.parent / "shared" / "data").is_dir():
        return repo_root.parent / "shared" / "data"
    cache = user_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    return cache
