"""Where the fused CPU kernels are cached on disk: one directory per user, shared by every install.

Note [kernel cache]
-------------------
numba caches a ``cache=True`` kernel beside its source file by default (``backends/__pycache__``): an editable install
and a regular install of ringattn on one machine then compile every kernel twice, and uninstalling leaves the cache
files behind in site-packages. ringattn's kernels use a per-user directory instead:

* ``$RINGATTN_CACHE_DIR`` when set;
* else ``$NUMBA_CACHE_DIR`` when set: the user's choice for every numba cache, left to numba's own locator;
* else ``$XDG_CACHE_HOME/ringattn/numba``, or ``~/.cache/ringattn/numba`` without ``XDG_CACHE_HOME``.

Inside it, one subdirectory per package and *source stamp* (``ringattn.backends-<hash>``), not per install path: the
stamp is a hash of the contents of every ``backends/numba_*.py``, so every install whose kernel sources are the same
shares the compiled kernels, and installs of different sources (two versions, two git worktrees) keep theirs apart
instead of overwriting one another's index. numba's own stamp covers the kernel's file only, so an edit of a helper
it inlines from another file would otherwise leave a stale kernel. numba's own key (signature, CPU, numba version,
the function's bytecode) applies within. A directory that cannot be created or written falls back to numba's
default. Directories of older sources stay until ``--clear``.

``ringattn compile --clear`` deletes the directory; ``ringattn compile --where`` prints it. This is a locator class
of numba's caching API (``numba.core.caching.CacheImpl._locator_classes``), installed by :func:`install` when a
kernel module is imported and consulted only for ringattn's own functions; other packages' numba caches are
untouched.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

__all__ = ["CACHE_ENV", "cache_dir", "install"]

CACHE_ENV = "RINGATTN_CACHE_DIR"
_SOURCES = Path(__file__).parent


def cache_dir() -> Path | None:
    """The directory the fused kernels are cached in, or None when ``NUMBA_CACHE_DIR`` decides (Note [kernel
    cache]). Read from the environment at each call."""
    own = os.environ.get(CACHE_ENV)
    if own:
        return Path(own).expanduser()
    if os.environ.get("NUMBA_CACHE_DIR"):
        return None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ringattn" / "numba"


def effective_dir() -> Path:
    """Where the kernels' files go: :func:`cache_dir`, or numba's ``NUMBA_CACHE_DIR``."""
    return cache_dir() or Path(os.environ["NUMBA_CACHE_DIR"]).expanduser()


@functools.cache
def _stamp(files: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for name, _, _ in files:
        digest.update(name.encode())
        digest.update((_SOURCES / name).read_bytes())
    return digest.hexdigest()


def source_stamp() -> str:
    """A hash of every ``backends/numba_*.py`` (re-read when one's size or modification time changes)."""
    files = []
    for path in sorted(_SOURCES.glob("numba_*.py")):
        st = path.stat()
        files.append((path.name, st.st_mtime_ns, st.st_size))
    return _stamp(tuple(files))


_installed = False


def install() -> None:
    """Put ringattn's locator first in numba's list (once per process). Call before the kernels are decorated."""
    global _installed
    if _installed:
        return
    from numba.core import caching

    class RingattnCacheLocator(caching._CacheLocator):
        """numba cache locator for ``ringattn.*`` functions: the per-user directory of Note [kernel cache]."""

        def __init__(self, py_func, py_file: str, root: Path) -> None:
            self._py_file = py_file
            self._lineno = py_func.__code__.co_firstlineno
            self._cache_path = str(root / f"{py_func.__module__.rpartition('.')[0]}-{source_stamp()[:16]}")

        def get_cache_path(self) -> str:
            return self._cache_path

        def get_source_stamp(self) -> str:
            return source_stamp()

        def get_disambiguator(self) -> str:
            return str(self._lineno)

        @classmethod
        def from_function(cls, py_func, py_file):
            module = getattr(py_func, "__module__", "") or ""
            root = cache_dir()
            if not module.startswith("ringattn.") or root is None or not os.path.exists(py_file):
                return None
            self = cls(py_func, py_file, root)
            try:
                self.ensure_cache_path()
            except OSError:  # not writable: numba's default locators
                return None
            return self

    impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl", None)  # renamed in numba 0.61
    classes = getattr(impl, "_locator_classes", None)
    if isinstance(classes, list) and not any(c.__name__ == "RingattnCacheLocator" for c in classes):
        classes.insert(0, RingattnCacheLocator)  # another numba: its default locators, beside the source
    _installed = True
