"""Reading files written by torch.save and torch.jit.save (calibrators, checkpoints, mixtures),
safely and with one-line errors.

`torch.load` runs with ``weights_only=True`` unless the caller trusts the file: a pickle of
arbitrary Python objects can run code when it is loaded. Every failure becomes a BLDAError
that starts with the caller's `where` (the file, or the option and file) and says what the file
is instead: missing, a folder, not written by torch.save, a truncated archive, a TorchScript
archive where a state was expected, a corrupt pickle, or Python objects beyond tensors and plain
containers (naming their class). torch's own messages end in advice to torch's users (re-run
with ``weights_only=False``, file an issue, read the docs), which is kept out of ours.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path

from blda_tools.errors import BLDAError
from blda_tools.fileio import check_input_file, describe_os_error

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's current format, and torch.jit.save's
_PICKLE_MAGIC = b"\x80"  # torch.save's legacy format (pickle protocol >= 2)
# torch's two wordings: a global not allowed by default, and one whose module it blocks
# ("Trying to load unsupported GLOBAL posix.system whose module posix is blocked").
_UNSUPPORTED_GLOBAL = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)")
_TORCH_ADVICE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def load_torch(
    path: str | os.PathLike,
    where: str,
    expected: str,
    trusted: bool = False,
    trust_option: str | None = None,
    torchscript_advice: str = "",
):
    """`torch.load(path)` on the CPU, tensors and plain containers only unless `trusted`.
    `expected` names what the file should be ("a blda calibrator file"); `trust_option` is how
    the user can allow full unpickling, when the caller offers it; `torchscript_advice` what to
    do with a TorchScript archive instead."""
    import torch

    path = _checked_torch_file(path, where, expected, torchscript_advice)
    try:
        with warnings.catch_warnings():
            # torch's note on a plain pickle's protocol: the error below says what matters
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as error:
        if "Unsupported operand" in str(error) and _is_plain_pickle(path):
            advice = (
                f", or, if you trust its origin, load it with {trust_option}"
                if trust_option
                else ""
            )
            raise BLDAError(
                f"{where}: a file written by pickle.dump, not torch.save; torch reads such a "
                f"file safely only in torch.save's format: save it with torch.save{advice}"
            ) from None
        unsupported = _UNSUPPORTED_GLOBAL.search(str(error))
        if unsupported and not trusted:
            advice = (
                f" If you trust its origin, load it with {trust_option}." if trust_option else ""
            )
            raise BLDAError(
                f"{where}: the file stores Python objects beyond tensors and plain containers "
                f"({unsupported.group(1)}), which are not unpickled by default.{advice}"
            ) from None
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        informative = [line for line in lines if not line.startswith(_TORCH_ADVICE)]
        reason = informative[0] if informative else "unreadable"
        raise BLDAError(f"{where}: not {expected} (a corrupt pickle: {reason})") from None
    except (ImportError, AttributeError) as error:
        # Only when trusted: full unpickling imports the classes the file names (an mmcv
        # Config in a checkpoint's meta, a class of the script that saved it).
        raise BLDAError(
            f"{where}: unpickling needs a class this Python cannot import ({error}); install "
            "the package that saved it, or save only its tensors (the state_dict)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise BLDAError(
            f"{where}: cannot be read as {expected} ({type(error).__name__}: "
            f"{_first_sentence(error)})"
        ) from None


def load_torchscript(path: str | os.PathLike, where: str, advice: str = ""):
    """`torch.jit.load(path)` on the CPU; `advice` ends the error (how to make an archive)."""
    import torch

    path = check_input_file(path, where, "a TorchScript archive")
    suffix = f"; {advice}" if advice else ""
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError, OSError) as error:
        raise BLDAError(
            f"{where}: not a TorchScript archive ({_first_sentence(error)}){suffix}"
        ) from None


def _checked_torch_file(path, where: str, expected: str, torchscript_advice: str) -> Path:
    """`path` when it looks like a file torch.save wrote; else a BLDAError saying what it is.
    Only the first bytes and a zip's directory are read, not the tensors."""
    path = check_input_file(path, where, expected)
    try:
        with open(path, "rb") as file:
            magic = file.read(4)
        if magic != _ZIP_MAGIC:
            names = []
        else:
            with zipfile.ZipFile(path) as archive:  # its directory only
                names = archive.namelist()
    except zipfile.BadZipFile:
        raise BLDAError(f"{where}: not {expected} (a truncated or corrupt zip archive)") from None
    except OSError as error:
        raise BLDAError(f"{where}: cannot be read ({describe_os_error(error)})") from None
    if magic != _ZIP_MAGIC and magic[:1] != _PICKLE_MAGIC:
        raise BLDAError(f"{where}: not {expected} (expected a file written by torch.save)")
    if any(name.endswith("/constants.pkl") for name in names):  # what torch.jit.save adds
        advice = f"; {torchscript_advice}" if torchscript_advice else ""
        raise BLDAError(f"{where}: a TorchScript archive, not {expected}{advice}")
    return path


def _first_sentence(error: BaseException) -> str:
    """The first sentence of an exception's first line (torch appends paragraphs of advice)."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else "unreadable"
    return line.split(". ")[0].rstrip(".")


def _is_plain_pickle(path) -> bool:
    """Whether `path` starts as `pickle.dump` writes protocols 2 and up (torch.save writes a
    zip archive, or its legacy format, which starts with a small pickle of protocol 2)."""
    with open(path, "rb") as file:
        head = file.read(2)
    return len(head) == 2 and head[0] == 0x80 and head[1] >= 4
