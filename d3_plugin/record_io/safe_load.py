"""Load BackdoorBench's torch pickles without running code from them.

`safe_torch_load` is `torch.load(weights_only=True)` with an explicit allow-list of exactly what attack /
defense results hold besides tensors: numpy arrays, scalars and dtypes (under their numpy-1 `numpy.core.*`
and numpy-2 `numpy._core.*` names alike) and PIL images (in-memory poisoned samples). Anything else is
refused with `UnsafeCheckpoint` naming the global; there is no fallback to unsafe loading.
"""
from __future__ import annotations

import os
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..files import check_file


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read (missing, truncated, corrupt, or not what we expected)."""


class UnsafeCheckpoint(CheckpointError):
    """A checkpoint that needs a global outside the allow-list (it could run code when unpickled)."""


# The numpy functions that rebuild arrays and scalars, taken from numpy itself so that this works under
# numpy 1 and 2; files name them by the module of the numpy that wrote them.
_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_SCALAR = np.int64(0).__reduce__()[0]
# Concrete dtype classes a BackdoorBench file holds (index arrays, indicators, images, labels); a dtype
# instance is restored via BUILD, which torch allows only for allow-listed types.
_DTYPE_CODES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                "float16", "float32", "float64", "complex64", "complex128")


def allowed_globals() -> list:
    """The allow-list: (object, pickled name) pairs for aliases, plain objects otherwise."""
    names = []
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        names += [(_RECONSTRUCT, f"{module}._reconstruct"), (_SCALAR, f"{module}.scalar")]
    dtype_classes = sorted({type(np.dtype(code)) for code in _DTYPE_CODES}, key=lambda t: t.__name__)
    return names + [np.ndarray, np.dtype, *dtype_classes, Image.Image]


_GLOBAL_IN_MESSAGE = re.compile(r"GLOBAL (\S+)|unrecognized function (.+?)(?: which|$)|but got (<[^>]+>)")


def safe_torch_load(path: str | os.PathLike):
    """`torch.load` of a trusted-format file, refusing anything but tensors, containers, numpy and PIL data."""
    path = check_file(path, "check the path (a record folder holds attack_result.pt)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty; re-run the attack/defense that writes it")
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise _explain(path, error) from None
    except (EOFError, RuntimeError, OSError, ValueError, KeyError, IndexError, struct.error) as error:
        raise CheckpointError(f"{path} is truncated or corrupt ({_first_sentence(error)}); re-create it (re-run the attack "
                              f"or copy it again)") from None


def _explain(path: Path, error: Exception) -> CheckpointError:
    text = str(error)
    found = _GLOBAL_IN_MESSAGE.search(text)
    if found:
        name = next(g for g in found.groups() if g)
        return UnsafeCheckpoint(f"{path} refused: it needs {name}, which is not in the safe allow-list "
                                f"(tensors, numpy arrays/scalars/dtypes, PIL images); only load it if you "
                                f"trust it, by converting it to a plain state dict in a trusted environment")
    detail = text.split("WeightsUnpickler error:")[-1]
    return CheckpointError(f"{path} cannot be unpickled safely ({_first_sentence(detail)}); re-create the file")


def _first_sentence(error) -> str:
    """A short reason: the error type and the first sentence of its message."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = text.split(". ")[0][:160]
    name = type(error).__name__ if isinstance(error, BaseException) else ""
    return f"{name}: {text}" if name and text else (name or text or "unknown error")
