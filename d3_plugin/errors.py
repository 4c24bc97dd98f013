"""One mapping of input errors to one-line messages, shared by every front end (`d3-plugin …` and the
installed `defense/<name>.py` scripts): what the user's input or environment caused is printed as one
line with exit status 2; Ctrl-C as one line with status 130; anything else is a bug and keeps its traceback."""
from __future__ import annotations

import pickle

import yaml
from PIL import Image

# ValueError: bad settings or data; OSError: missing, unreadable, foreign or edited files, disk full;
# the rest: damaged or hostile files (pickles, YAML, images)
INPUT_ERRORS = (ValueError, OSError, pickle.UnpicklingError, yaml.YAMLError, Image.DecompressionBombError)
INPUT_ERROR_STATUS, INTERRUPTED_STATUS = 2, 130
OUT_OF_MEMORY_FIX = ("lower the batch size (--batch_size, --eval_batch_size, or --set batch_size=N) or free the "
                     "GPU (docs/gpu.md)")


def is_out_of_memory(error: BaseException) -> bool:
    """torch.OutOfMemoryError (torch.cuda's): the machine, not a bug; told as one line with the fix."""
    return type(error).__name__ == "OutOfMemoryError" and isinstance(error, RuntimeError)


def out_of_memory_line(error: BaseException) -> str:
    return f"out of GPU memory ({one_line(error)[:200]}); {OUT_OF_MEMORY_FIX}"


def one_line(error: BaseException) -> str:
    """The error as a single line (multi-line messages, e.g. YAML's, are joined)."""
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, yaml.YAMLError):
        return f"invalid YAML: {text}"
    if isinstance(error, Image.DecompressionBombError):
        return f"refusing an image that large (decompression bomb?): {text}"
    if isinstance(error, pickle.UnpicklingError):
        return f"refusing a damaged or unsafe pickle: {text}"
    return text
