"""The one training loop every defense and attack uses.

A training run is an `objective(model, inputs, labels) -> (loss, stats)` minimised by an optimizer,
epoch by epoch, with an optional `after_step(model)` hook (D3's projection) and an `on_epoch`
callback (evaluation). Optimizers are driven through `step(closure)`, so a SAM optimizer, which needs
two forward/backward passes per step, plugs in unchanged.

`precision` (`d3_plugin.precision`: auto | bf16 | fp16 | fp32; None = plain fp32) puts the objective's
forward under autocast and conv models and batches in channels_last; weights and optimizer state stay
fp32. fp16 adds a GradScaler: the closure runs once, then `scaler.step(optimizer)` (so not with SAM).

`checkpoint` (an `EpochCheckpoint`) makes a run resumable after a kill: fit saves its whole state after
every epoch and, when the file exists, continues from it (on a CPU bit-identical to an uninterrupted run
on the same hardware, precision and thread count; on a GPU equal up to its nondeterministic kernels:
docs/gpu.md).
"""
from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import one_line
from .files import torch_save
from .precision import Precision, model_device, resolve_precision
from .record_io.safe_load import safe_torch_load
from .sam import SAM

Objective = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], tuple]
Stats = Dict[str, float]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` → cuda when available, else cpu; anything else is passed to torch.device."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        check_gpu_exists(resolved, device)
    return resolved


def check_gpu_exists(resolved: torch.device, given) -> None:
    """A one-line ValueError unless CUDA is available and has the GPU `resolved` names (`cuda`: any)."""
    if not torch.cuda.is_available():
        raise ValueError(f"device {str(given)!r} requested but CUDA is not available; use --device cpu or auto")
    count = torch.cuda.device_count()
    if resolved.index is not None and resolved.index >= count:
        visible = "cuda:0" if count == 1 else f"cuda:0 … cuda:{count - 1}"
        raise ValueError(f"device {str(given)!r} names GPU {resolved.index}, but this machine shows {count} "
                         f"GPU{'s' if count != 1 else ''} ({visible}); use --device cuda:0 (or auto)")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def sgd(parameters: Iterable[torch.nn.Parameter], lr: float, momentum: float = 0.9,
        weight_decay: float = 0.0) -> torch.optim.SGD:
    return torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay)


def cosine(optimizer: torch.optim.Optimizer, epochs: int):
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))


def cross_entropy(label_smoothing: float = 0.0) -> Objective:
    """Plain classification objective: mean cross-entropy."""
    def objective(model, inputs, labels):
        loss = F.cross_entropy(model(inputs).float(), labels, label_smoothing=label_smoothing)
        return loss, {"loss": loss.detach()}
    return objective


def train_epoch(model: torch.nn.Module, batches: Iterable, optimizer: torch.optim.Optimizer,
                objective: Objective, *, after_step: Optional[Callable[[torch.nn.Module], None]] = None,
                bn_train: bool = True, precision: str | Precision | None = None, scaler=None) -> Stats:
    """One pass over `batches`; returns each stat averaged over batches (one host sync per epoch).

    `precision`: autocast and input memory format (see the module docstring); `scaler`: a GradScaler
    (fit makes one for fp16). With a scaler, a step whose stats overflowed (it skips that step) is left
    out of the means; an epoch of nothing but such steps has non-finite means (fit then stops: Diverged).
    """
    mode = resolve_precision(precision, model_device(model), model=model, sam=isinstance(optimizer, SAM))
    if scaler is not None and isinstance(optimizer, SAM):
        raise ValueError("a GradScaler (precision fp16) cannot drive SAM's two-pass step; use --precision bf16 or fp32")
    model.train(bn_train)
    totals: Dict[str, torch.Tensor] = {}
    count, overflowed = 0, 0  # overflowed: steps a GradScaler skipped (a tensor on the device once counted)
    for inputs, labels in batches:
        inputs = mode.batch(inputs)
        recorded: Dict[str, torch.Tensor] = {}

        def closure():
            optimizer.zero_grad(set_to_none=True)
            with mode.autocast():
                loss, stats = objective(model, inputs, labels)
            (loss if scaler is None else scaler.scale(loss)).backward()
            if not recorded:  # SAM calls the closure twice: keep the stats at the unperturbed weights
                recorded.update(stats)
            return loss

        if scaler is None:
            optimizer.step(closure)
        else:  # GradScaler.step takes no closure: one pass, then an unscaled step (skipped on inf/NaN)
            closure()
            scaler.step(optimizer)
            scaler.update()
        if after_step is not None:
            after_step(model)
        if scaler is not None:
            recorded, overflow = without_overflow(recorded)
            overflowed = overflowed + overflow
        for key, value in recorded.items():
            totals[key] = totals.get(key, 0) + value.detach()
        count += 1
    kept = count - int(overflowed)
    return {key: float(value) / kept if kept else math.nan for key, value in totals.items()}


def without_overflow(stats: Dict[str, torch.Tensor]):
    """(the step's stats, zeroed when any is non-finite; 1 if so, else 0), as tensors (no host sync): a
    GradScaler skips such a step (fp16 overflow), so it should not count in the epoch's means."""
    values = {key: value.detach() for key, value in stats.items()}
    if not values:
        return values, 0
    finite = torch.stack([value.isfinite().all() for value in values.values()]).all()
    return {key: torch.where(finite, value, torch.zeros_like(value)) for key, value in values.items()}, \
        (~finite).long()


class Diverged(ValueError):
    """Training produced a non-finite loss or non-finite weights."""


def check_finite(model: torch.nn.Module, stats: Stats, epoch: int) -> None:
    """Raise Diverged, in one line, when an epoch's stats or the model's floating-point tensors are not finite."""
    bad = sorted(key for key, value in stats.items() if not math.isfinite(value))
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    if not bad and (not tensors or bool(torch.stack([t.isfinite().all() for t in tensors]).all())):
        return
    what = f"the {', '.join(bad)} became non-finite" if bad else "the weights became non-finite"
    raise Diverged(f"training diverged in epoch {epoch}: {what}; lower the learning rate (--lr) or check the "
                   f"record's model and data")


def fit(model: torch.nn.Module, batches: Iterable, optimizer: torch.optim.Optimizer, objective: Objective,
        epochs: int, *, scheduler=None, after_step=None, bn_train: bool = True,
        on_epoch: Optional[Callable[[int, torch.nn.Module], Stats]] = None, on_epoch_every: int = 1,
        precision: str | Precision | None = None, progress: Optional[str] = None,
        checkpoint: Optional["EpochCheckpoint"] = None) -> List[Stats]:
    """Train for `epochs`; each history row holds the epoch's mean stats, its lr and `on_epoch`'s results.

    `on_epoch` runs after every `on_epoch_every`-th epoch and after the last (`due`). `precision`: see
    the module docstring; a conv model is in channels_last while it trains (when chosen) and comes back
    in its own format. `progress` names a tqdm bar over epochs (None: no bar). A non-finite loss or weight
    after an epoch stops the run with `Diverged`. `checkpoint`: saved after each epoch, once its
    `on_epoch` has run; an existing one is restored first and training goes on with the next epoch (a
    finished one returns its history at once). The returned history holds every epoch's row.
    """
    if int(on_epoch_every) < 1:
        raise ValueError(f"on_epoch_every must be a positive integer, got {on_epoch_every!r}")
    mode = resolve_precision(precision, model_device(model), model=model, sam=isinstance(optimizer, SAM))
    scaler = mode.grad_scaler()
    history: List[Stats] = []
    if checkpoint is not None:
        history = checkpoint.restore(epochs, model, optimizer, scheduler, scaler, batches)
    bar = tqdm(range(len(history), epochs), desc=progress, leave=False, disable=progress is None,
               initial=len(history), total=epochs)
    with mode.formatted(model):
        for epoch in bar:
            row: Stats = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"]}
            row.update(train_epoch(model, batches, optimizer, objective, after_step=after_step, bn_train=bn_train,
                                   precision=mode, scaler=scaler))
            check_finite(model, row, epoch + 1)
            if scheduler is not None:
                scheduler.step()
            if on_epoch is not None and due(epoch + 1, epochs, on_epoch_every):
                row.update(on_epoch(epoch + 1, model))
            history.append(row)
            if checkpoint is not None:
                checkpoint.save(epochs, model, optimizer, scheduler, scaler, batches, history)
            bar.set_postfix({k: round(v, 3) for k, v in row.items() if k in ("loss", "acc", "asr")})
    return history


CHECKPOINT_FORMAT = "d3_plugin.epoch_checkpoint/1"
CHECKPOINT_KEYS = ("format", "epochs", "done", "history", "model", "optimizer", "scheduler", "scaler", "rng", "extra")
RESUME_FIX = "delete it to start over or drop --resume"


@dataclass
class EpochCheckpoint:
    """The file `fit` saves after every epoch and resumes from, written atomically and read back only
    through the safe loader. It holds the epochs done and in total, the model, optimizer, scheduler and
    GradScaler states, the torch (CPU, CUDA), numpy and `random` RNG states, the state of the loader's
    `generator`, the history so far and `extra`.

    `extra` identifies the run (e.g. D3's θs_init and norms): tensors, numbers, strings, lists and dicts.
    A file whose `extra` or total of epochs differs is refused with a one-line ValueError.
    """

    path: Path
    extra: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.path = Path(self.path)

    def save(self, epochs, model, optimizer, scheduler, scaler, batches, history: List[Stats]) -> None:
        torch_save({"format": CHECKPOINT_FORMAT, "epochs": epochs, "done": len(history), "history": history,
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": None if scheduler is None else scheduler.state_dict(),
                    "scaler": None if scaler is None else scaler.state_dict(),
                    "rng": rng_states(batches), "extra": self.extra}, self.path)

    def restore(self, epochs, model, optimizer, scheduler, scaler, batches) -> List[Stats]:
        """Load the file into the run's objects and return its history; [] when there is no file yet."""
        if not self.path.exists():
            return []
        state = self.load(epochs)
        try:
            model.load_state_dict(state["model"])
            getattr(optimizer, "base", optimizer).load_state_dict(state["optimizer"])  # SAM: its base optimizer
            if scheduler is not None and state["scheduler"] is not None:
                scheduler.load_state_dict(state["scheduler"])
            if scaler is not None and state["scaler"] is not None:
                scaler.load_state_dict(state["scaler"])
            restore_rng_states(state["rng"], batches)
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as error:
            raise ValueError(f"checkpoint {self.path} does not fit this run ({type(error).__name__}: "
                             f"{one_line(error)[:160]}); "
                             f"{RESUME_FIX}") from None
        return list(state["history"])

    def load(self, epochs: int) -> dict:
        """The file's contents, checked against this run (its epochs and `extra`)."""
        try:
            state = safe_torch_load(self.path)
        except (OSError, ValueError) as error:  # CheckpointError / UnsafeCheckpoint are ValueErrors
            raise ValueError(f"checkpoint {self.path} is corrupt or unreadable ({type(error).__name__}); "
                             f"{RESUME_FIX}") from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or \
                not set(CHECKPOINT_KEYS) <= set(state) or not isinstance(state["history"], list) or \
                state["done"] != len(state["history"]):
            raise ValueError(f"checkpoint {self.path} is not a complete d3_plugin epoch checkpoint; {RESUME_FIX}")
        if state["epochs"] != epochs:
            raise ValueError(f"checkpoint {self.path} is for a {state['epochs']}-epoch run, this run has {epochs} "
                             f"epochs; {RESUME_FIX}")
        different = first_difference(state["extra"], self.extra)
        if different is not None:
            raise ValueError(f"checkpoint {self.path} belongs to another run (its {different} differs: another "
                             f"input model or settings?); {RESUME_FIX}")
        return state


def first_difference(stored, given, name: str = "extra") -> Optional[str]:
    """The name of the first part where `stored` and `given` differ (tensors bit for bit), else None."""
    if isinstance(stored, torch.Tensor) and isinstance(given, torch.Tensor):
        same = stored.dtype == given.dtype and torch.equal(stored.cpu(), given.detach().cpu())
        return None if same else name
    if isinstance(stored, dict) and isinstance(given, dict):
        if set(stored) != set(given):
            return name
        parts = [(stored[key], given[key], f"{name}[{key!r}]") for key in given]
    elif isinstance(stored, (list, tuple)) and isinstance(given, (list, tuple)):
        if len(stored) != len(given):
            return name
        parts = [(a, b, f"{name}[{i}]") for i, (a, b) in enumerate(zip(stored, given))]
    else:
        return None if type(stored) is type(given) and stored == given else name
    for a, b, part in parts:
        different = first_difference(a, b, part)
        if different is not None:
            return different
    return None


def rng_states(batches) -> dict:
    """Every random state a run draws from, in types the safe loader reads (tensors, ints, lists, tuples)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    generator = getattr(batches, "generator", None)
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if cuda_in_use() else [],
            "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(gauss)],
            "random": random.getstate(),
            "loader": generator.get_state() if isinstance(generator, torch.Generator) else None}


def cuda_in_use() -> bool:
    """CUDA is initialised in this process (asking for CUDA RNG states otherwise would initialise it: a
    context on every GPU for a run, or a pool worker, that computes on the CPU)."""
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def restore_rng_states(states: dict, batches) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and cuda_in_use() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = states["random"]
    random.setstate((version, tuple(internal), gauss_next))
    generator = getattr(batches, "generator", None)
    if isinstance(generator, torch.Generator) and states["loader"] is not None:
        generator.set_state(states["loader"])


def due(epoch: int, epochs: int, every: int) -> bool:
    """Whether epoch `epoch` (1-based) of `epochs` is one to evaluate: every `every`-th, and the last."""
    return epoch % every == 0 or epoch == epochs


def train_classifier(model: torch.nn.Module, batches: Iterable, *, epochs: int, lr: float, momentum: float = 0.9,
                     weight_decay: float = 0.0, label_smoothing: float = 0.0, sam_rho: float = 0.0,
                     adaptive_sam: bool = True, device=None, on_epoch=None, eval_every: int = 1,
                     progress: Optional[str] = None, checkpoint: Optional[EpochCheckpoint] = None):
    """Train a copy of `model` with cross-entropy, SGD (inside (A)SAM when sam_rho > 0) and a cosine
    schedule; returns (model, history). Fine-tuning, FT-SAM, backdoor training and SAM flattening are
    all this one recipe with different settings. `device`: move the copy there first (default: stay).
    `on_epoch` runs every `eval_every` epochs and after the last. `checkpoint`: see fit (its `extra` should
    identify the input model and settings)."""
    model = copy.deepcopy(model) if device is None else copy.deepcopy(model).to(device)
    base = sgd(model.parameters(), lr, momentum, weight_decay)
    optimizer = SAM(base, sam_rho, adaptive_sam) if sam_rho > 0 else base
    history = fit(model, batches, optimizer, cross_entropy(label_smoothing), epochs,
                  scheduler=cosine(base, epochs), on_epoch=on_epoch, on_epoch_every=eval_every, progress=progress,
                  checkpoint=checkpoint)
    return model, history
