"""The D3 paper's analyses as plain functions (no file I/O; `d3-plugin analyze` writes the files).

    ts = interpolation_grid(21, 2.0)                                  # t = 0, 0.1, ..., 2
    curve = interpolation_curve(model, init, end, ts, bench.evaluate)  # Fig. 2: losses, ACC, ASR along θ_t
    names = selected_weight_names(model, default_layers("small_cnn"))  # D3's θs
    deltas = weight_differences(init, end, names)                      # Fig. 4b: θ_end − θ_init, flattened
    features = penultimate_features(model, loader)                     # Fig. 4a: input of the last nn.Linear
    xy = embed_tsne(features, seed=0)
    table = relative_cost(compare_rows)                                # Fig. 3: seconds relative to FT

States are `state_dict()`s. Interpolation treats floating-point parameters and buffers (BatchNorm running
mean and variance) alike; integer buffers (num_batches_tracked) keep the initial state's value.
"""
from __future__ import annotations

import copy
import math
import statistics
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

State = Mapping[str, torch.Tensor]
FT = "ft"
NO_DEFENSE = "no defense"
MEAN = "mean"


# --- Fig. 2: the loss landscape between θ_init and a defense's endpoint ------------------------------------

def _same_keys(init: State, end: State) -> None:
    if set(init) != set(end):
        only_init = sorted(set(init) - set(end))[:3]
        only_end = sorted(set(end) - set(init))[:3]
        raise ValueError(f"the two models have different parameters (only in the first: {', '.join(only_init) or '-'}; "
                         f"only in the second: {', '.join(only_end) or '-'}); interpolation needs one architecture")
    for key in init:
        if init[key].shape != end[key].shape:
            raise ValueError(f"{key} has shape {tuple(init[key].shape)} in the first model and "
                             f"{tuple(end[key].shape)} in the second; interpolation needs one architecture")


def interpolate_state(init: State, end: State, t: float) -> Dict[str, torch.Tensor]:
    """θ_t = θ_init + t (θ_end − θ_init) for every floating-point entry (t outside [0, 1] extrapolates);
    integer entries are θ_init's. A BatchNorm running variance is clamped at 0 (extrapolation can push it
    below, which no model can use). Tensors stay on θ_init's device."""
    _same_keys(init, end)
    state = {}
    for key, start in init.items():
        if not torch.is_floating_point(start):
            state[key] = start.clone()
            continue
        finish = end[key].to(device=start.device, dtype=start.dtype)
        value = torch.lerp(start, finish, float(t)) if 0.0 <= t <= 1.0 else start + float(t) * (finish - start)
        if key.endswith("running_var"):
            value = value.clamp_min(0.0)
        state[key] = value
    return state


def interpolation_grid(points: int = 21, t_max: float = 2.0) -> List[float]:
    """`points` evenly spaced values of t in [0, t_max] (both ends included)."""
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise ValueError(f"--points must be an integer ≥ 2, got {points!r}")
    if not (math.isfinite(t_max) and t_max > 0):
        raise ValueError(f"--t_max must be a positive number, got {t_max!r}")
    return [round(float(t), 10) for t in np.linspace(0.0, t_max, points)]


def interpolation_curve(model: nn.Module, init_state: State, end_state: State, ts: Iterable[float],
                        evaluate_fn: Callable[[nn.Module], Mapping[str, float]]) -> List[Dict[str, float]]:
    """For every t: `evaluate_fn` of a copy of `model` holding θ_t; rows {"t": t, **metrics}. `model` itself
    is left unchanged."""
    _same_keys(init_state, end_state)
    probe = copy.deepcopy(model)
    rows = []
    for t in ts:
        probe.load_state_dict(interpolate_state(init_state, end_state, t))
        rows.append({"t": float(t), **{k: float(v) for k, v in evaluate_fn(probe).items()}})
    return rows


# --- Fig. 4b: how far the selected weights moved ------------------------------------------------------

def selected_weight_names(model: nn.Module, layers: Optional[Sequence[str]] = None) -> List[str]:
    """State-dict names of the weights in `layers` as D3 selects them (`d3.select_weights`: every
    nn.Linear/nn.Conv2d weight inside each named module; None → every nn.Linear weight)."""
    from .d3 import select_weights

    return list(select_weights(model, layers))


def _flat(state: State, names: Sequence[str], what: str) -> torch.Tensor:
    missing = [n for n in names if n not in state]
    if missing:
        raise ValueError(f"{', '.join(missing[:3])} not in the {what} state; name weights of the model")
    if not names:
        raise ValueError("no weights selected; name at least one layer")
    return torch.cat([state[n].detach().to("cpu", torch.float64).flatten() for n in names])


def weight_differences(init_state: State, end_state: State, layer_names: Sequence[str]) -> np.ndarray:
    """θ_end − θ_init of the named state entries, flattened and concatenated (float64, in name order)."""
    return (_flat(end_state, layer_names, "end") - _flat(init_state, layer_names, "initial")).numpy()


def weight_summary(init_state: State, end_state: State, layer_names: Sequence[str]) -> Dict[str, float]:
    """n, mean |Δ|, ‖Δ‖_F (the norm of all selected weights together) and cosine(θ_end, θ_init) over the
    named entries (cosine is nan when either vector is zero)."""
    start, finish = _flat(init_state, layer_names, "initial"), _flat(end_state, layer_names, "end")
    delta = finish - start
    norms = float(torch.linalg.vector_norm(start) * torch.linalg.vector_norm(finish))
    return {"n": int(delta.numel()), "mean_abs": float(delta.abs().mean()),
            "frobenius": float(torch.linalg.vector_norm(delta)),
            "cosine": float(torch.dot(start, finish)) / norms if norms > 0 else float("nan")}


def shared_histogram(values: Mapping[str, np.ndarray], bins: int = 60):
    """Histograms of several arrays over one set of bins spanning all of them: (edges, {name: counts})."""
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"--bins must be a positive integer, got {bins!r}")
    arrays = {name: np.asarray(v, dtype=np.float64).ravel() for name, v in values.items()}
    everything = np.concatenate(list(arrays.values())) if arrays else np.zeros(0)
    if everything.size == 0:
        raise ValueError("nothing to histogram: no weights selected")
    low, high = float(everything.min()), float(everything.max())
    if low == high:  # all equal (e.g. nothing moved): one unit-wide range around the value
        low, high = low - 0.5, high + 0.5
    edges = np.linspace(low, high, bins + 1)
    return edges, {name: np.histogram(v, bins=edges)[0] for name, v in arrays.items()}


# --- Fig. 4a: penultimate features and their t-SNE ------------------------------------------------------

def last_linear(model: nn.Module) -> nn.Linear:
    """The last nn.Linear registered in the model (the classifier head of the supported architectures)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the model has no nn.Linear; penultimate features are the input of its last one")
    return linears[-1]


def penultimate_features(model: nn.Module, loader: Iterable) -> np.ndarray:
    """The input of the model's last nn.Linear (a forward hook) for every batch of `loader`
    ((inputs, labels) batches on the model's device), in eval mode: float32 array (N, in_features) on CPU."""
    head, captured = last_linear(model), []

    def keep(_module, inputs, _output):
        captured.append(inputs[0].detach().flatten(1).to("cpu", torch.float32, copy=True))

    was_training = model.training
    handle = head.register_forward_hook(keep)
    model.eval()
    try:
        with torch.inference_mode():
            for inputs, _labels in loader:
                model(inputs)
    finally:
        handle.remove()
        model.train(was_training)
    if not captured:
        raise ValueError("no samples to take features of")
    return torch.cat(captured).numpy()


def sample_indices(n: int, k: int, seed: int) -> torch.Tensor:
    """A seeded random subset of min(k, n) indices of range(n), in increasing order."""
    if k < 1:
        raise ValueError(f"--samples must be ≥ 1, got {k}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[:min(k, n)].sort().values


def embed_tsne(features: np.ndarray, seed: int, perplexity: Optional[float] = None) -> np.ndarray:
    """scikit-learn's t-SNE of the rows of `features` into 2-D (init "pca", random_state = seed):
    array (N, 2). Perplexity defaults to min(30, (N − 1) / 3), so small sets work."""
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        raise ImportError("t-SNE needs scikit-learn: pip install 'd3-plugin[analysis]'") from None
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 4:
        raise ValueError(f"t-SNE needs at least 4 samples as rows of a 2-D array, got shape {features.shape}")
    if perplexity is None:
        perplexity = min(30.0, (len(features) - 1) / 3)
    tsne = TSNE(n_components=2, init="pca", random_state=seed, perplexity=perplexity)
    return tsne.fit_transform(features)


# --- Fig. 3: training cost relative to FT --------------------------------------------------------------

def relative_cost(rows: Iterable[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """Per defense (first-seen order) over compare/grid run rows: mean and sample std (None for one run) of
    `seconds`, the run count n and mean / FT's mean. Aggregate rows (seed "mean"), the no-defense row and
    failed runs (an error, or no seconds) are left out; a defense with no finished run has n = 0 and no
    numbers."""
    groups: Dict[str, List[float]] = {}
    for row in rows:
        if row.get("seed") == MEAN or row.get("defense") == NO_DEFENSE or "defense" not in row:
            continue
        seconds = groups.setdefault(str(row["defense"]), [])
        if not row.get("error") and row.get("seconds") is not None:
            seconds.append(float(row["seconds"]))
    if not groups.get(FT):
        raise ValueError("cost needs an ft row; add ft to the compare/grid")
    ft_mean = statistics.fmean(groups[FT])
    if ft_mean <= 0:
        raise ValueError(f"ft's mean time is {ft_mean} s; cannot express costs relative to it")
    table = []
    for defense, seconds in groups.items():
        mean = statistics.fmean(seconds) if seconds else None
        table.append({"defense": defense, "seconds_mean": mean,
                      "seconds_std": statistics.stdev(seconds) if len(seconds) > 1 else None, "n": len(seconds),
                      "relative_to_ft": None if mean is None else mean / ft_mean})
    return table
