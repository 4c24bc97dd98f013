"""On a real GPU, what CPU tests cannot show: autocast and GradScaler, channels_last, BatchNorm folding,
resume (on the GPU and across devices), the loader, RNG hygiene and every native defense on a CUDA model.
Every test here is marked `cuda` and skips, with the reason, on a machine without one
(`python -m pytest -m cuda`; benchmarks/gpu_check.sh runs them). tests/test_gpu.py pins the decisions on any
machine."""
import copy
import math

import pytest
import torch

from d3_plugin import compare as cmp
from d3_plugin import registry
from d3_plugin.attacks.input_aware import build_networks
from d3_plugin.d3 import D3Config, detoxify
from d3_plugin.data import DatasetSpec, ImageSet, Loader
from d3_plugin.evaluation import evaluate, folded
from d3_plugin.models import build_model
from d3_plugin.d3_targets import default_layers
from d3_plugin.precision import NATIVE_BF16_CAPABILITY, resolve_precision
from d3_plugin.training import cross_entropy, fit, resolve_device, seed_everything, sgd

from conftest import TEST_SEED

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="no CUDA GPU on this machine (torch.cuda.is_available() is False)")]

SPEC = DatasetSpec("random", 10, 1, 28, (0.5,), (0.5,), crop_padding=2, horizontal_flip=True)
EPOCHS, KILLED_IN = 3, 2


def images(n=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8),
                    torch.randint(0, 10, (n,), generator=g))


def model_on(device, seed=TEST_SEED):
    seed_everything(seed)
    return build_model("small_cnn", 10, 1, 28).to(device)


def native_defenses():
    return sorted(e.name for e in registry.list_entries() if e.where == "native" and e.data != "poisoned")


def test_auto_precision_matches_the_gpu_generation_and_keeps_fp32_weights():
    native = torch.cuda.get_device_capability() >= NATIVE_BF16_CAPABILITY
    model = model_on("cuda")
    mode = resolve_precision("auto", "cuda", model=model)
    assert (mode.name, mode.needs_scaler, mode.channels_last) == (("bf16", False, True) if native else
                                                                   ("fp16", True, True))
    formats = []

    def on_epoch(epoch, m):
        formats.append(all(p.is_contiguous(memory_format=torch.channels_last) for p in m.parameters() if p.dim() == 4))
        return {}
    optimizer = sgd(model.parameters(), 0.05)
    history = fit(model, Loader(images(), SPEC, 32, train=True, device="cuda"), optimizer, cross_entropy(), 2,
                  precision="auto", on_epoch=on_epoch)
    assert all(math.isfinite(row["loss"]) for row in history) and all(formats)
    assert all(p.dtype == torch.float32 and p.is_contiguous() for p in model.parameters())


def test_loader_on_the_gpu_yields_the_cpu_loaders_batches():
    data = images(100)
    cpu = list(Loader(data, SPEC, 32, train=True, seed=3))
    gpu = list(Loader(data, SPEC, 32, train=True, device="cuda", seed=3))
    assert len(cpu) == len(gpu)
    for (x, y), (u, v) in zip(cpu, gpu):
        assert u.device.type == "cuda" and torch.equal(y, v.cpu()) and torch.allclose(x, u.cpu())


def test_bn_folding_on_the_gpu_keeps_the_predictions():
    model = model_on("cuda").eval()
    inputs = next(iter(Loader(images(64), SPEC, 64, device="cuda")))[0]
    with torch.no_grad():
        assert torch.allclose(folded(model)(inputs), model(inputs), atol=1e-4)
    batches = Loader(images(64), SPEC, 32, device="cuda")
    assert evaluate(model, batches, fold=True)["acc"] == evaluate(model, batches, fold=False)["acc"]


def purify(device, checkpoint=None, kill_in=None):
    config = D3Config(epochs=EPOCHS, batch_size=32, layers=default_layers("small_cnn"), lr=0.02, precision="fp32")

    def on_epoch(epoch, model):
        if epoch == kill_in:
            raise KeyboardInterrupt
        return {}
    return detoxify(model_on(device), Loader(images(), SPEC, 32, train=True, device=device), config,
                    on_epoch=on_epoch, checkpoint=checkpoint)


def test_resume_on_the_gpu_repeats_the_run_within_its_rounding(tmp_path):
    """What docs/gpu.md promises on CUDA: the same data order, augmentation and RNG states; weights equal up
    to the GPU's nondeterministic kernels (bit-identical only on the CPU)."""
    reference, expected = purify("cuda")
    path = tmp_path / "d3.ckpt"
    with pytest.raises(KeyboardInterrupt):
        purify("cuda", path, KILLED_IN)
    model, history = purify("cuda", path)
    assert len(history) == EPOCHS
    for key, value in reference.state_dict().items():
        assert torch.allclose(value.float(), model.state_dict()[key].float(), rtol=1e-3, atol=1e-4), key


@pytest.mark.parametrize("first, then", [("cuda", "cpu"), ("cpu", "cuda")])
def test_a_checkpoint_resumes_on_the_other_device(tmp_path, first, then):
    path = tmp_path / "d3.ckpt"
    with pytest.raises(KeyboardInterrupt):
        purify(first, path, KILLED_IN)
    model, history = purify(then, path)
    assert len(history) == EPOCHS and next(model.parameters()).device.type == then


def test_input_aware_networks_leave_the_cuda_generator_alone():
    torch.zeros(1, device="cuda")  # CUDA initialised, as in a GPU run
    before = torch.cuda.get_rng_state()
    build_networks(3, 8, seed=5)
    assert torch.equal(torch.cuda.get_rng_state(), before)


def test_a_gpu_index_beyond_the_machine_is_refused():
    count = torch.cuda.device_count()
    assert resolve_device(f"cuda:{count - 1}").index == count - 1
    with pytest.raises(ValueError, match=f"names GPU {count}, but this machine shows {count} GPU"):
        resolve_device(f"cuda:{count}")


@pytest.mark.parametrize("name", native_defenses())
def test_every_native_defense_runs_on_a_cuda_model(record, name):
    bench = cmp.bench_from_record(record, ratio=0.25, seed=0, device="cuda")
    original = copy.deepcopy(bench.model.state_dict())
    metrics = cmp.run_native(bench, cmp.build_for(name, bench, epochs=1))
    assert all(0 <= metrics[key] <= 1 for key in ("acc", "asr"))
    assert all(torch.equal(value, original[key]) for key, value in bench.model.state_dict().items())


@pytest.mark.parametrize("precision", ["auto", "bf16", "fp16", "fp32"])
def test_d3_trains_at_every_cuda_precision(precision):
    config = D3Config(epochs=1, batch_size=32, layers=default_layers("small_cnn"), precision=precision)
    batches = Loader(images(), SPEC, 32, train=True, device="cuda")
    if precision == "bf16" and torch.cuda.get_device_capability() < NATIVE_BF16_CAPABILITY:
        with pytest.raises(ValueError, match="native bf16"):
            detoxify(model_on("cuda"), batches, config)
        return
    model, history = detoxify(model_on("cuda"), batches, config)
    assert math.isfinite(history[-1]["loss"]) and next(model.parameters()).dtype == torch.float32
