"""Numeric precision and memory format of training and evaluation, decided in one place.

    precision: auto | bf16 | fp16 | fp32        (D3Config.precision; BackdoorBench --precision / --amp)

    auto  CUDA: bf16 autocast when the run's own GPU computes bf16 natively (compute capability ≥ 8.0:
                Ampere and newer; no loss scaling needed, works with SAM), else (T4, V100, RTX 20xx: bf16
                only emulated, slowly) fp16 autocast with a dynamic GradScaler — or fp32 when the
                optimizer is SAM, whose two-pass step(closure) a GradScaler cannot drive.
          CPU:  bf16 autocast when the CPU computes bf16 natively (AVX512-BF16 or AMX), else fp32.
          other devices: fp32.
    bf16  bf16 autocast (CUDA: needs native bf16, capability ≥ 8.0; CPU: any, slow without native bf16).
    fp16  CUDA only: fp16 autocast with a dynamic GradScaler; not with SAM. On a CPU it is an error
          (no fast fp16 path there): use bf16, auto or fp32.
    fp32  no autocast.

Autocast only: weights, gradients and optimizer state stay fp32, losses are computed from logits cast
to fp32, and code that must stay exact (D3's distance and projection) runs outside autocast
(`full_precision`). Memory format: a model with an nn.Conv2d and its 4-D input batches are put in
channels_last on a CPU (oneDNN's fast layout, in fp32 too) and on CUDA with bf16/fp16 (tensor cores);
`channels_last=True/False` overrides that rule. `precision=None` means plain fp32 in the model's
current memory format (what callers that do not ask for anything get).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import torch
from torch import nn

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(name) -> str:
    """`name` if it is one of PRECISIONS, else a one-line ValueError naming the option and the fix."""
    if name not in PRECISIONS:
        raise ValueError(f"precision {name!r} is not one of {' | '.join(PRECISIONS)}; "
                         f"pass --precision auto (or bf16, fp16, fp32)")
    return name


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPU computes bf16 matmuls/convolutions natively (torch's own probes)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    for probe in probes:
        check = getattr(torch.cpu, probe, None)
        try:
            if check is not None and check():
                return True
        except Exception:  # noqa: BLE001 - a failing probe means "unknown", i.e. not supported
            continue
    return False


NATIVE_BF16_CAPABILITY = (8, 0)  # Ampere: the first GPUs whose tensor cores compute bf16


def cuda_has_bf16(device: Union[str, torch.device] = "cuda") -> bool:
    """Whether the GPU `device` names (`cuda`: the current one) computes bf16 natively. Not
    torch.cuda.is_bf16_supported(): that counts emulation (slow) and asks about the current GPU only."""
    return torch.cuda.is_available() and \
        tuple(torch.cuda.get_device_capability(torch.device(device))) >= NATIVE_BF16_CAPABILITY


def has_conv(model: Optional[nn.Module]) -> bool:
    return model is not None and any(isinstance(m, nn.Conv2d) for m in model.modules())


def model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


@dataclass(frozen=True)
class Precision:
    """A resolved precision: `name` is bf16, fp16 or fp32 (never auto) on `device_type`."""

    name: str = "fp32"
    device_type: str = "cpu"
    channels_last: bool = False

    @property
    def dtype(self) -> Optional[torch.dtype]:
        return DTYPES.get(self.name)

    @property
    def needs_scaler(self) -> bool:
        """fp16 needs loss scaling (bf16 has fp32's exponent range and does not)."""
        return self.name == "fp16"

    def autocast(self):
        """The autocast context for forward passes (a no-op for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self):
        """A dynamic GradScaler for fp16, else None."""
        return torch.amp.GradScaler(self.device_type) if self.needs_scaler else None

    def batch(self, inputs: torch.Tensor) -> torch.Tensor:
        """An input batch in the chosen memory format."""
        if self.channels_last and inputs.dim() == 4:
            return inputs.contiguous(memory_format=torch.channels_last)
        return inputs

    @contextlib.contextmanager
    def formatted(self, model: nn.Module) -> Iterator[nn.Module]:
        """Within the block the model is in channels_last (when chosen); afterwards it is back in the
        format it came in. Parameters keep their identity (only `.data` changes)."""
        convs = [p for p in model.parameters() if p.dim() == 4]
        convert = self.channels_last and any(not p.is_contiguous(memory_format=torch.channels_last) for p in convs)
        if convert:
            model.to(memory_format=torch.channels_last)
        try:
            yield model
        finally:
            if convert:
                model.to(memory_format=torch.contiguous_format)


def resolve_precision(precision: Union[str, Precision, None], device: Union[str, torch.device] = "cpu", *,
                      model: Optional[nn.Module] = None, sam: bool = False,
                      channels_last: Optional[bool] = None) -> Precision:
    """`auto | bf16 | fp16 | fp32` on `device` → a Precision (rules in the module docstring).

    `model` decides whether channels_last applies (it needs an nn.Conv2d); `sam`: the optimizer is SAM,
    which rules out fp16 (auto falls back, an explicit fp16 is an error). A Precision passes through.
    """
    if isinstance(precision, Precision):
        return precision
    device_type = torch.device(device).type
    if precision is None:
        return Precision("fp32", device_type, bool(channels_last) and has_conv(model))
    name = check_precision(precision)
    if name == "auto":
        if device_type == "cuda":
            name = "bf16" if cuda_has_bf16(device) else ("fp32" if sam else "fp16")
        elif device_type == "cpu":
            name = "bf16" if cpu_has_native_bf16() else "fp32"
        else:
            name = "fp32"
    elif name == "fp16":
        if device_type != "cuda":
            raise ValueError(f"precision fp16 needs a CUDA device (no fast fp16 path on {device_type}); "
                             f"use --precision bf16, auto or fp32")
        if sam:
            raise ValueError("precision fp16 needs a GradScaler, which cannot drive SAM's two-pass step; "
                             "use --precision bf16 or fp32")
    elif name == "bf16":
        if device_type == "cuda" and not cuda_has_bf16(device):
            raise ValueError(f"precision bf16 needs a GPU with native bf16 (compute capability ≥ 8.0), which "
                             f"{device} is not; use --precision auto, fp16 or fp32")
        if device_type not in ("cpu", "cuda") and not torch.amp.is_autocast_available(device_type):
            raise ValueError(f"precision bf16 has no autocast on {device_type}; use --precision fp32")
    if channels_last is None:
        channels_last = device_type == "cpu" or (device_type == "cuda" and name != "fp32")
    return Precision(name, device_type, bool(channels_last) and has_conv(model))


def full_precision(device: Union[str, torch.device, torch.Tensor]):
    """A context in which autocast is off on `device` (for computations that must stay fp32)."""
    if isinstance(device, torch.Tensor):
        device = device.device
    device_type = torch.device(device).type
    if not torch.amp.is_autocast_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)
