"""The CUDA path's decisions, pinned on any machine: torch.cuda's answers and Ray's resources are patched,
so each test checks what the code asks for (a device, a precision, GPUs for a worker), not what a GPU does.
tests/test_cuda.py runs on a real GPU."""
import concurrent.futures
import math
import multiprocessing
import os
import sys
import types

import pytest
import torch
from torch import nn

from d3_plugin import devices, grid as grid_module, precision as precision_module
from d3_plugin.attacks.input_aware import build_networks
from d3_plugin.cli import main
from d3_plugin.data import DatasetSpec, ImageSet, Loader
from d3_plugin.precision import Precision, resolve_precision
from d3_plugin.training import cross_entropy, resolve_device, rng_states, sgd, train_epoch


def fake_gpus(monkeypatch, capabilities):
    """This process sees GPUs of the given compute capabilities (cuda:0, cuda:1, …); CUDA is not initialised.
    torch.cuda.is_bf16_supported says True, as it does (counting emulation) on every GPU since Volta."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(capabilities))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)

    def capability(device=None):
        index = torch.device(device).index if device is not None else None
        return capabilities[0 if index is None else index]
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)


def conv_model():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))


# --- 2: precision auto from the run's own GPU -----------------------------------------------------------

@pytest.mark.parametrize("device, expected", [("cuda:0", "fp16"), ("cuda:1", "bf16"), ("cuda", "fp16")])
def test_auto_is_bf16_only_on_a_gpu_with_native_bf16_the_run_uses(monkeypatch, device, expected):
    fake_gpus(monkeypatch, [(7, 5), (8, 0)])  # a T4 (bf16 emulated) and an A100; `cuda` is the current, cuda:0
    mode = resolve_precision("auto", device, model=conv_model())
    assert (mode.name, mode.needs_scaler, mode.channels_last) == (expected, expected == "fp16", True)
    assert resolve_precision("auto", device, sam=True).name == ("bf16" if expected == "bf16" else "fp32")


def test_explicit_bf16_on_a_gpu_that_only_emulates_it_is_a_one_line_error(monkeypatch):
    fake_gpus(monkeypatch, [(7, 5), (9, 0)])
    assert resolve_precision("bf16", "cuda:1").name == "bf16"
    with pytest.raises(ValueError, match=r"native bf16 \(compute capability ≥ 8.0\).*cuda:0.*--precision auto, fp16"):
        resolve_precision("bf16", "cuda:0")


# --- 4: a GPU index that does not exist ---------------------------------------------------------------

@pytest.mark.parametrize("device", ["cuda:7", "cuda:1"])
def test_a_gpu_index_beyond_the_machine_is_a_one_line_error(monkeypatch, device):
    fake_gpus(monkeypatch, [(8, 6)])
    assert resolve_device("cuda:0") == torch.device("cuda:0") and resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(ValueError, match=rf"device '{device}' names GPU \d, but this machine shows 1 GPU \(cuda:0\); "
                                         r"use --device cuda:0"):
        resolve_device(device)


def test_backdoorbench_multi_gpu_device_on_a_one_gpu_machine_exits_2_in_one_line(monkeypatch, capsys, tmp_path):
    fake_gpus(monkeypatch, [(8, 6)])
    from d3_plugin.backdoorbench.defense import BackdoorBenchDefense

    defense = BackdoorBenchDefense.__new__(BackdoorBenchDefense)
    defense.args = types.SimpleNamespace(device="cuda:2,3")
    with pytest.raises(ValueError, match=r"'cuda:2' names GPU 2, but this machine shows 1 GPU") as error:
        defense._device()
    assert "\n" not in str(error.value)
    assert main(["demo", "--device", "cuda:7", "--out", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'cuda:7' names GPU 7" in err and not (tmp_path / "demo").exists()


# --- 6 and the CPU-only workers: CUDA is left alone ------------------------------------------------------

def test_input_aware_networks_reseed_no_gpu_and_restore_the_cpu_generator(monkeypatch):
    seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: seeded.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: seeded.append(seed))
    before = torch.get_rng_state()
    first = build_networks(3, 8, seed=5)
    assert torch.equal(torch.get_rng_state(), before) and seeded == []
    again = build_networks(3, 8, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(first[0].state_dict().values(), again[0].state_dict().values()))


def test_checkpoint_rng_states_do_not_initialise_cuda_in_a_cpu_process(monkeypatch):
    fake_gpus(monkeypatch, [(8, 0)])

    def initialise():
        raise AssertionError("asked for CUDA RNG states while CUDA is not in use (initialises it)")
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", initialise)
    assert rng_states(None)["cuda"] == []


# --- 3: the loader sends each epoch's order and augmentation once, without blocking ------------------

def test_loader_copies_without_blocking_and_draws_an_epoch_at_once(monkeypatch):
    spec = DatasetSpec("x", 3, 3, 8, (0.5,) * 3, (0.25,) * 3, crop_padding=2, horizontal_flip=True)
    g = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (50, 3, 8, 8), generator=g, dtype=torch.uint8),
                    torch.randint(0, 3, (50,), generator=g))
    loader = Loader(data, spec, 8, train=True, seed=1)
    copies, original = [], torch.Tensor.to

    def recording(tensor, *args, **kwargs):
        if args and isinstance(args[0], (torch.device, str)):
            copies.append((tensor.dtype, kwargs.get("non_blocking", False)))
        return original(tensor, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "to", recording)
    batches = list(loader)
    assert len(batches) == 7 and copies and all(blocking for _, blocking in copies)
    index_copies = [dtype for dtype, _ in copies if dtype in (torch.long, torch.bool)]
    assert len(index_copies) == 4  # the order, dy, dx and the flips: once an epoch, not once a batch


def test_gic_reads_its_losses_once_an_epoch_not_once_a_step(monkeypatch):
    from d3_plugin.gic import GICConfig, fit_calibrator

    spec = DatasetSpec("x", 3, 3, 8, (0.5,) * 3, (0.25,) * 3)
    g = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (24, 3, 8, 8), generator=g, dtype=torch.uint8),
                    torch.randint(0, 3, (24,), generator=g))
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 3)).eval()
    reads, item = [], torch.Tensor.item

    def read(tensor):  # ours only: Adam reads its step counter, a CPU tensor, every step (no GPU sync)
        if "d3_plugin" in sys._getframe(1).f_code.co_filename:
            reads.append(tensor)
        return item(tensor)
    monkeypatch.setattr(torch.Tensor, "item", read)
    _, history = fit_calibrator(model, data, spec, GICConfig(epochs=2, batch_size=8), labeled=True)
    assert reads == [] and len(history) == 2 and all(math.isfinite(row["bn"]) for row in history)


# --- 5: local pool workers over the GPUs -----------------------------------------------------------------

@pytest.mark.parametrize("named, expected", [(None, ["0", "1", "0"]), ("2,3", ["2", "3", "2"])])
def test_local_pool_workers_take_the_visible_gpus_round_robin(monkeypatch, named, expected):
    fake_gpus(monkeypatch, [(8, 0), (8, 0)])
    if named is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", named)
    gpus = devices.worker_gpus(["auto"], workers=3)
    assert devices.worker_gpus(["cuda:1"], 3) == devices.worker_gpus(["cpu"], 3) == devices.worker_gpus(["auto"], 1) == []
    counter, seen = multiprocessing.get_context("spawn").Value("i", 0), []
    for _ in range(3):  # three workers starting, each in its own environment
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", named or "")
        devices.take_gpu(gpus, counter)
        seen.append(os.environ["CUDA_VISIBLE_DEVICES"])
    assert seen == expected


def test_local_pool_hands_its_gpus_to_every_worker(monkeypatch):
    started = {}

    class Executor:  # records how the pool starts its workers, runs the calls here
        def __init__(self, workers, mp_context, initializer, initargs):
            started.update(workers=workers, initializer=initializer, gpus=initargs[1])

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def submit(self, function, *args, **kwargs):
            future = concurrent.futures.Future()
            future.set_result(function(*args, **kwargs))
            return future
    monkeypatch.setattr("concurrent.futures.ProcessPoolExecutor", Executor)
    results = list(grid_module.LocalPool(2, gpus=["0", "1"]).map(lambda x, threads: x, [(1,), (2,)]))
    assert sorted(results) == [1, 2]
    assert started == {"workers": 2, "initializer": grid_module.start_worker, "gpus": ["0", "1"]}


# --- 1: Ray tasks ask for GPUs ---------------------------------------------------------------------------

class FakeRay(types.ModuleType):
    """What RayPool asks of Ray: the cluster's resources and each task's num_cpus / num_gpus."""

    def __init__(self, cluster_gpus):
        super().__init__("ray")
        self.cluster_gpus, self.requests = cluster_gpus, []

    def is_initialized(self):
        return True

    def cluster_resources(self):
        return {"CPU": 2.0, **({"GPU": self.cluster_gpus} if self.cluster_gpus else {})}

    def remote(self, num_cpus, num_gpus):
        self.requests.append(num_gpus)
        return lambda function: types.SimpleNamespace(remote=lambda *args, **kwargs: function(*args, **kwargs))

    def wait(self, pending, num_returns):
        return pending[:1], pending[1:]

    def get(self, result):
        return result


@pytest.mark.parametrize("device, cluster_gpus, requested, asked", [
    ("auto", 2, None, 1.0), ("cuda", 1, None, 1.0), ("cuda:0", 1, None, 1.0), ("auto", 0, None, 0.0),
    ("cpu", 4, None, 0.0), ("cuda", 4, 0.5, 0.5)])
def test_ray_tasks_ask_for_a_gpu_whenever_the_grid_computes_on_one(monkeypatch, device, cluster_gpus, requested,
                                                                  asked):
    ray = FakeRay(cluster_gpus)
    monkeypatch.setitem(sys.modules, "ray", ray)
    pool = grid_module.RayPool(cpus=1, gpus=requested, devices=[device])
    assert list(pool.map(lambda x, threads: x, [(1,)])) == [1]
    assert ray.requests == [asked]


@pytest.mark.parametrize("device, cluster_gpus, requested, message", [
    ("cuda", 0, None, r"device cuda but the Ray cluster has no GPU; set device: auto or cpu"),
    ("auto", 0, 1, r"--gpus-per-task 1 but the Ray cluster has no GPU"),
    ("cuda", 2, 0, r"device cuda with --gpus-per-task 0: Ray hides every GPU .*drop --gpus-per-task"),
    ("cuda:1", 2, None, r"device cuda:1 cannot be used on Ray: .*set device: cuda")])
def test_ray_combinations_that_cannot_work_are_refused_in_one_line(monkeypatch, device, cluster_gpus, requested,
                                                                   message):
    monkeypatch.setitem(sys.modules, "ray", FakeRay(cluster_gpus))
    with pytest.raises(ValueError, match=message) as error:
        grid_module.RayPool(gpus=requested, devices=[device])
    assert "\n" not in str(error.value)


# --- also: fp16 overflow, out of memory ----------------------------------------------------------------

def test_a_step_a_grad_scaler_skips_does_not_count_in_the_epoch_mean():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    batches = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(3)]
    plain = cross_entropy()

    def overflowing(m, inputs, labels):  # the second batch overflows, as fp16 logits can
        loss, stats = plain(m, inputs, labels)
        if inputs is batches[1][0]:
            loss = loss * math.inf
            stats = {"loss": loss.detach()}
        return loss, stats
    expected = [plain(model, *batches[i])[0].item() for i in (0, 2)]
    scaler = torch.amp.GradScaler("cpu")
    before = [p.detach().clone() for p in model.parameters()]
    stats = train_epoch(model, batches, sgd(model.parameters(), 0.0), overflowing, precision=Precision(), scaler=scaler)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # lr 0: same losses as above
    assert stats["loss"] == pytest.approx(sum(expected) / 2, rel=1e-6)
    every = train_epoch(model, batches[1:2], sgd(model.parameters(), 0.0), overflowing, precision=Precision(),
                        scaler=torch.amp.GradScaler("cpu"))
    assert math.isnan(every["loss"])  # nothing but skipped steps: fit stops with Diverged


def test_out_of_memory_is_one_line_with_the_fix(monkeypatch, capsys):
    from d3_plugin.commands import list as list_command

    def run(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nSee the documentation")
    monkeypatch.setattr(list_command, "run", run)
    assert main(["list"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "out of GPU memory" in err and "--batch_size" in err and "--eval_batch_size" in err
