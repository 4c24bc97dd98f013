"""ACC / ASR / RA (one forward pass per test set) and the paper's DER."""
from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch
import torch.nn.functional as F

from .precision import Precision, model_device, resolve_precision

# Batch size of the test-set passes when the user names none. On a CPU small batches stay in the caches:
# at 2 threads on this project's EPYC, batch 64 ran 368 img/s against 293 at 512 in bf16, 155 against 117 in fp32
# (benchmarks/precision.py --threads 2); GPUs want large batches.
EVAL_BATCH_SIZES = {"cpu": 64}
GPU_EVAL_BATCH_SIZE = 512


def eval_batch_size(device, requested: Optional[int] = None) -> int:
    """`requested`, or the default test-set batch size for `device` (64 on a CPU, 512 elsewhere)."""
    if requested:
        return int(requested)
    return EVAL_BATCH_SIZES.get(torch.device(device).type, GPU_EVAL_BATCH_SIZE)


def _predict(model: torch.nn.Module, batches: Iterable, mode: Precision):
    """Predictions and mean per-batch cross-entropy (against the loader's labels) over a whole loader."""
    predictions, batch_losses = [], []
    for inputs, labels in batches:
        with mode.autocast():
            logits = model(mode.batch(inputs))
        logits = logits.float()
        batch_losses.append(F.cross_entropy(logits, labels))
        predictions.append(logits.argmax(1))
    loss = torch.stack(batch_losses).mean().item() if batch_losses else float("nan")
    return torch.cat(predictions), loss


def folded(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of an eval-mode `model` with each Conv2d→BatchNorm2d pair folded into one conv (torch.fx's
    `fuse`): the same function with fewer passes over memory. At batch 64 on this project's CPU, 373 against
    368 img/s, the fold itself (≈ 0.1 s, a copy per call) included (benchmarks/precision.py).
    Returns `model` itself when it has no BatchNorm2d, carries forward hooks (tracing would drop them:
    BadActs' clipping is one) or cannot be traced."""
    modules = list(model.modules())
    if not any(isinstance(m, torch.nn.BatchNorm2d) for m in modules) or \
            any(m._forward_hooks or m._forward_pre_hooks for m in modules):
        return model
    from torch.fx.experimental.optimization import fuse
    try:
        return fuse(model)
    except Exception:  # noqa: BLE001 - a model torch.fx cannot trace is evaluated as it is
        return model


def evaluate(model: torch.nn.Module, clean_test=None, backdoor_test=None, *,
             precision: str | Precision | None = None, fold: bool = True) -> Dict[str, float]:
    """Evaluate on a clean test loader and/or a poisoned test loader.

    The poisoned loader's labels are the backdoor labels and its `data.original_labels` the true
    classes; it should hold only samples whose true class differs from the target (all-to-one).
    Returns fractions in [0, 1]: `acc`, `asr`, `ra`, and mean per-batch losses `clean_loss`, `bd_loss`.
    Runs under torch.inference_mode; `precision` (auto | bf16 | fp16 | fp32, `d3_plugin.precision`;
    None = plain fp32) sets autocast and channels_last. The loaders' batch size is the evaluation's.
    `fold`: evaluate a copy with its BatchNorms folded into the convolutions (`folded`); `model` is untouched.
    """
    mode = resolve_precision(precision, model_device(model), model=model)
    was_training = model.training
    model.eval()
    results: Dict[str, float] = {}
    try:
        runner = folded(model) if fold else model
        with mode.formatted(runner), torch.inference_mode():  # convert outside inference mode
            if clean_test is not None:
                predictions, results["clean_loss"] = _predict(runner, clean_test, mode)
                results["acc"] = _accuracy(predictions, clean_test.data.labels)
            if backdoor_test is not None:
                predictions, results["bd_loss"] = _predict(runner, backdoor_test, mode)
                results["asr"] = _accuracy(predictions, backdoor_test.data.labels)
                results["ra"] = _accuracy(predictions, backdoor_test.data.original_labels)
    finally:
        model.train(was_training)
    return results


def _accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    return (predictions.cpu() == labels.cpu()).float().mean().item()


def defense_effectiveness_rate(acc_before: float, asr_before: float, acc_after: float,
                               asr_after: float) -> float:
    """DER = [max(0, ΔASR) − max(0, ΔACC) + 1] / 2 with Δ = before − after (paper; values in [0, 1]).

    BackdoorBench's `utils/metric.py` adds the ΔACC term instead of subtracting it; this does not.
    """
    for value in (acc_before, asr_before, acc_after, asr_after):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"DER takes fractions in [0, 1], got {value}")
    return (max(0.0, asr_before - asr_after) - max(0.0, acc_before - acc_after) + 1.0) / 2.0


def summarize(before: Dict[str, float], after: Dict[str, float]) -> Dict[str, Optional[float]]:
    """ACC / ASR / RA of `after` plus DER relative to `before`."""
    return {"acc": after["acc"], "asr": after["asr"], "ra": after["ra"],
            "der": defense_effectiveness_rate(before["acc"], before["asr"], after["acc"], after["asr"])}
