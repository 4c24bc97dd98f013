"""Run one of BackdoorBench's own scripts (or a BackdoorBench fork's) unmodified on a current stack.

    python benchmarks/backdoorbench_runner.py CHECKOUT SCRIPT [ARGS...]

e.g. `/work/bbenv/bin/python benchmarks/backdoorbench_runner.py /work/bb attack/badnet.py --yaml_path ...`.

Runs in BackdoorBench's venv and imports nothing from d3_plugin. It changes the working directory to
CHECKOUT (their scripts rely on it), then executes SCRIPT as `__main__` with `runpy`. The only changes
to the environment their code sees, all made here and none in their files:

- torchvision's CIFAR md5 check is reduced to "the file exists" (`torchvision.datasets.cifar.
  check_integrity`, used by `CIFAR10._check_integrity` and `_load_meta`), because the benchmark renders
  its own data in CIFAR-10's python-batch layout (benchmarks/backdoorbench_records.py);
- `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`, since their `torch.load` calls of attack results predate
  torch 2.6's `weights_only=True` default;
- numpy aliases removed in numpy 1.24/2.0 (`np.infty`, `np.Inf`, `np.NaN`, `np.float`, `np.int`,
  `np.object`, `np.str`, `np.complex`), set only when missing.
"""
from __future__ import annotations

import os
import runpy
import sys


def _patch() -> None:
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    import numpy as np

    aliases = {"infty": np.inf, "Inf": np.inf, "NaN": np.nan, "float": float, "int": int,
               "object": object, "str": str, "complex": complex}
    for name, value in aliases.items():
        try:
            getattr(np, name)
        except AttributeError:
            setattr(np, name, value)

    import torchvision.datasets.cifar as cifar

    cifar.check_integrity = lambda fpath, md5=None: os.path.isfile(fpath)

    threads = os.environ.get("BB_TORCH_THREADS")
    if threads:
        import torch
        torch.set_num_threads(int(threads))


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit(__doc__)
    checkout, script, args = os.path.abspath(argv[0]), argv[1], argv[2:]
    _patch()
    os.chdir(checkout)
    sys.path.insert(0, checkout)
    sys.argv = [script] + args
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
