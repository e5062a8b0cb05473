"""Compiled kernels: numba loops compiled once per installation, and saying so when they are.

`kernel` is the one decorator of blda's numba entry points (`numba.njit(nogil=True,
cache=True)`). The cache lives where numba puts it: `NUMBA_CACHE_DIR` when set, else the
package's `__pycache__` (an editable checkout or a writable site-packages), else the user's
cache folder (`~/.cache/numba`) when the package folder is read-only. So the first run of a
command after an install compiles (measured on a 2-core VM: `blda calibrate` on the sample
stores 46 s the first time, 20 s after) and every later process loads the machine code.

Two things numba leaves to us:

- A cached kernel is re-used as long as *its own file* is unchanged; helpers inlined from
  another module (`depends_on`) are part of its machine code too, so their sources are added
  to the cache's stamp: editing such a helper recompiles instead of running stale code.
- A compile says nothing. The first compile of a blda kernel in a process logs ONE info line,
  `COMPILE_NOTICE`, on the `blda_tools.runtime.jit` logger (the CLI shows it on stderr).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
from collections.abc import Callable
from types import ModuleType

import numba
from numba.core import event

logger = logging.getLogger(__name__)

COMPILE_NOTICE = "compiling kernels, once (up to a minute; later runs reuse them)"

_announced = False


def kernel(
    function: Callable | None = None,
    *,
    depends_on: tuple[ModuleType, ...] = (),
    parallel: bool = False,
    vectorise: bool = False,
):
    """`@kernel` or `@kernel(depends_on=(module, ...), parallel=..., vectorise=...)`: a cached
    numba kernel.

    `depends_on`: modules whose `numba.njit` helpers the kernel calls (inlined or not), so that
    a change to them invalidates the kernel's cache entry. `parallel`: numba's `prange` loops
    run on its thread pool. `vectorise`: loops with divisions and polynomials are vectorised: a
    division by zero gives inf or NaN as in numpy instead of raising (no branch in the loop),
    and a * b + c may be one rounding instead of two (LLVM's `contract` flag only: no
    reordering, NaN and infinities kept).
    """
    if function is None:
        return functools.partial(
            kernel,
            depends_on=depends_on,
            parallel=parallel,
            vectorise=vectorise,
        )
    _watch_compiles()
    options = dict(nogil=True, parallel=parallel)
    if vectorise:
        options.update(fastmath={"contract"}, error_model="numpy")
    try:
        dispatcher = numba.njit(cache=True, **options)(function)
    except RuntimeError as error:  # no writable cache folder anywhere
        logger.info(f"{function.__qualname__}: compiled in every process ({error}); "
                    "set NUMBA_CACHE_DIR to a writable folder to compile once")  # fmt: skip
        return numba.njit(**options)(function)
    if depends_on:
        _stamp_with_dependencies(dispatcher, depends_on)
    return dispatcher


def cache_folder(dispatcher) -> str | None:
    """Where `dispatcher` (a `kernel`) keeps its compiled code, None when it is not cached."""
    cache = getattr(dispatcher, "_cache", None)
    return getattr(cache, "cache_path", None)


def _stamp_with_dependencies(dispatcher, modules: tuple[ModuleType, ...]) -> None:
    # numba compares the stamp stored in the cache index with this one and ignores entries
    # written under another stamp (numba.core.caching.IndexDataCacheFile._load_index).
    cache_file = getattr(getattr(dispatcher, "_cache", None), "_cache_file", None)
    if not hasattr(cache_file, "_source_stamp"):  # a numba whose cache is built otherwise
        from numba.core.caching import NullCache

        dispatcher._cache = NullCache()  # compiled in every process rather than run stale
        logger.info(f"{dispatcher.py_func.__qualname__}: not cached with numba {numba.__version__}")
        return
    digest = hashlib.sha256(repr(cache_file._source_stamp).encode())
    for module in modules:
        with open(inspect.getfile(module), "rb") as source:
            digest.update(source.read())
    cache_file._source_stamp = ("blda_tools.runtime.jit", digest.hexdigest())


@functools.cache
def _watch_compiles() -> None:
    event.register("numba:compile", _CompileListener())


class _CompileListener(event.Listener):
    """Logs `COMPILE_NOTICE` when a blda kernel starts compiling (cache misses only: numba
    fires "numba:compile" after its cache lookup failed)."""

    def on_start(self, ev) -> None:
        global _announced
        if _announced:
            return
        dispatcher = (ev.data or {}).get("dispatcher")
        module = getattr(getattr(dispatcher, "py_func", None), "__module__", "") or ""
        if module.startswith("blda_tools."):
            _announced = True
            logger.info(COMPILE_NOTICE)

    def on_end(self, ev) -> None:
        pass
