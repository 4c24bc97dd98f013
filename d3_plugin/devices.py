"""Which GPUs a grid's workers and Ray tasks get (docs/gpu.md).

Local pool: with several workers and a grid on `auto` or `cuda`, worker k sees one GPU only, the k-th of
the visible ones (round robin, through CUDA_VISIBLE_DEVICES, set before the worker touches CUDA), so the
workers spread over the GPUs instead of all computing on GPU 0.

Ray: a task that asks for no GPU sees none (Ray sets its CUDA_VISIBLE_DEVICES to the empty list), and a
task that asks for one sees only its own, as cuda:0. So each task asks for one GPU when the grid computes
on a GPU and the cluster has some; combinations that cannot work are refused in one line.
"""
from __future__ import annotations

import os
from typing import Iterable, List, Optional

GPU_DEVICES = ("auto", "cuda")  # device strings that leave the GPU to the worker (no index)


def visible_gpus() -> List[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (else 0 … count − 1); no CUDA
    context is created (device_count does not initialise CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    named = os.environ.get("CUDA_VISIBLE_DEVICES")
    if named is not None:
        return [gpu.strip() for gpu in named.split(",") if gpu.strip()][:torch.cuda.device_count()]
    return [str(index) for index in range(torch.cuda.device_count())]


def worker_gpus(devices: Iterable[str], workers: int) -> List[str]:
    """The GPUs a local pool deals round robin to its workers: all visible ones when there are several
    workers, more than one GPU and every device is auto or cuda (a grid pinned to cuda:N stays there)."""
    devices = set(devices)
    if workers < 2 or not devices or not devices <= set(GPU_DEVICES):
        return []
    gpus = visible_gpus()
    return gpus if len(gpus) > 1 else []


def take_gpu(gpus: List[str], counter) -> None:
    """In a new worker, before CUDA is initialised: see only the next GPU of `gpus` (counter: a shared
    multiprocessing Value counting the workers started)."""
    if not gpus:
        return
    with counter.get_lock():
        slot = counter.value
        counter.value += 1
    os.environ["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]


def ray_gpus_per_task(requested: Optional[float], devices: Iterable[str], cluster_gpus: float) -> float:
    """The GPUs each Ray task asks for: `requested` (--gpus-per-task) when given, else 1 when a device is
    not cpu and the cluster has GPUs, else 0. A ValueError (one line) for what cannot work: a device
    cuda:N with N > 0 (a task sees its GPUs as cuda:0 …), a GPU device or request on a cluster without
    GPUs (tasks would never be scheduled), a cuda device with --gpus-per-task 0."""
    devices = set(devices)
    indexed = sorted(d for d in devices if d.startswith("cuda:") and d != "cuda:0")
    cuda = sorted(d for d in devices if d.startswith("cuda"))
    if indexed:
        raise ValueError(f"device {indexed[0]} cannot be used on Ray: a task sees only the GPUs Ray gives it, "
                         f"as cuda:0 …; set device: cuda (or auto) in the grid file")
    if cluster_gpus <= 0 and (cuda or (requested or 0) > 0):
        what = f"device {cuda[0]}" if cuda else f"--gpus-per-task {requested:g}"
        raise ValueError(f"{what} but the Ray cluster has no GPU; set device: auto or cpu in the grid file and "
                         f"drop --gpus-per-task, or start Ray on GPU nodes")
    if requested is None:
        return 1.0 if cluster_gpus > 0 and devices - {"cpu"} else 0.0
    if cuda and requested <= 0:
        raise ValueError(f"device {cuda[0]} with --gpus-per-task {requested:g}: Ray hides every GPU from a task "
                         f"that asks for none; drop --gpus-per-task (one GPU per task) or pass a positive one")
    return float(requested)
