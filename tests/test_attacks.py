"""Trigger functions, poisoning, the attack registry and record round trips (tiny real Fashion-MNIST)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from d3_plugin.attacks import BadNets
from d3_plugin.attacks.blended import Blended
from d3_plugin.attacks.lf import LowFrequency
from d3_plugin.attacks.registry import Attack, attacks, get_attack
from d3_plugin.attacks.sig import SIG
from d3_plugin.attacks.wanet import WaNet, poison_with_cross
from d3_plugin.data import load_dataset

from conftest import TEST_SEED

pytestmark = pytest.mark.trained  # see conftest.py

TRIGGERS = [BadNets(), Blended(), SIG(), WaNet(), LowFrequency()]


@pytest.fixture(scope="module")
def fmnist():
    test = load_dataset("fashion_mnist", False)
    return test.subset(torch.arange(300))


def random_batch(channels=1, size=28, n=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), generator=generator, dtype=torch.uint8)


@pytest.mark.parametrize("trigger", TRIGGERS, ids=lambda t: type(t).__name__)
def test_triggers_are_deterministic_and_keep_shape(trigger, fmnist):
    images = fmnist.images[:16]
    before = images.clone()
    out = trigger(images)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert torch.equal(images, before), "the trigger must not modify its input"
    assert torch.equal(out, trigger(images))
    assert torch.equal(out, type(trigger)()(images)), "a fresh trigger with the same parameters differs"
    assert not torch.equal(out, images)


@pytest.mark.parametrize("trigger", [Blended(), SIG(), WaNet(), LowFrequency()], ids=lambda t: type(t).__name__)
def test_triggers_work_per_sample_and_on_rgb(trigger):
    images = random_batch(channels=3, size=32)
    out = trigger(images)
    assert out.shape == images.shape
    assert torch.equal(out[2:3], trigger(images[2:3])), "a sample's trigger depends on the rest of the batch"


def test_badnets_touches_only_the_patch(fmnist):
    images = fmnist.images[:32]
    out = BadNets(size=3)(images)
    changed = (out != images).any(dim=(0, 1))
    assert changed[:25, :].sum() == 0 and changed[:, :25].sum() == 0
    assert (out[..., 25:, 25:] == 255).all()


def test_blended_is_the_alpha_mix_within_rounding(fmnist):
    trigger = Blended(alpha=0.2, seed=3)
    images = fmnist.images[:16]
    pattern = trigger.pattern_for(1, 28, 28)
    expected = 0.8 * images.float() + 0.2 * pattern
    assert (trigger(images).float() - expected).abs().max() <= 0.5 + 1e-4
    assert not torch.equal(pattern, Blended(seed=4).pattern_for(1, 28, 28))


def test_blended_from_an_image_file(tmp_path):
    from PIL import Image
    import numpy as np

    rgb = np.zeros((10, 20, 3), dtype=np.uint8)
    rgb[:, 10:] = (255, 255, 255)
    Image.fromarray(rgb).save(tmp_path / "pattern.png")
    trigger = Blended.from_image(tmp_path / "pattern.png", alpha=0.5)
    out = trigger(torch.zeros((2, 1, 28, 28), dtype=torch.uint8))
    assert out[..., :, :12].max() <= 1 and out[..., :, 16:].min() >= 127, "left half black, right half grey"
    with pytest.raises(FileNotFoundError, match="not found"):
        Blended.from_image(tmp_path / "missing.png")


def test_sig_adds_the_sinusoid_and_poisons_only_target_class(fmnist):
    images = torch.full((2, 1, 28, 28), 100, dtype=torch.uint8)
    out = SIG(delta=20, frequency=6)(images).float()
    columns = torch.arange(28, dtype=torch.float64)
    expected = (100 + 20 * torch.sin(2 * torch.pi * columns * 6 / 28)).float()
    assert (out - expected).abs().max() <= 0.5 + 1e-4
    assert (out[0, 0] == out[0, 0, :1]).all(), "every row carries the same signal"

    poisoned = get_attack("sig").poison_train(fmnist, ratio=0.1)
    changed = (poisoned.images != fmnist.images).flatten(1).any(1)
    assert poisoned.poisoned.any()
    assert (fmnist.labels[poisoned.poisoned] == 0).all(), "SIG is clean-label: only target-class images"
    assert not changed[~poisoned.poisoned].any()
    assert torch.equal(poisoned.labels, fmnist.labels), "clean-label poisoning must not relabel"


def test_wanet_warp_is_small_and_local(fmnist):
    images = fmnist.images[:32]
    out = WaNet(k=4, s=0.5)(images).float()
    # every warped pixel lies within the range of its 3×3 neighbourhood (displacement below one pixel)
    high = F.max_pool2d(images.float(), 3, 1, 1)
    low = -F.max_pool2d(-images.float(), 3, 1, 1)
    assert ((out >= low - 0.5) & (out <= high + 0.5)).all()
    assert (out - images.float()).abs().mean() < 20
    assert not torch.equal(WaNet(seed=1)(images), WaNet(seed=0)(images))


def test_wanet_noise_mode_keeps_labels_of_cross_samples(fmnist):
    poisoned = poison_with_cross(fmnist, WaNet(), ratio=0.1, target=0, seed=0, cross_ratio=2.0)
    relabelled = poisoned.labels != poisoned.original_labels
    cross = poisoned.poisoned & ~relabelled
    assert relabelled.sum() == 30 and (poisoned.labels[relabelled] == 0).all()
    assert cross.sum() == 60
    changed = (poisoned.images != fmnist.images).flatten(1).any(1)
    assert not changed[~poisoned.poisoned].any()
    assert not torch.equal(poisoned.images[cross], WaNet()(fmnist.images[cross])), "cross samples need noise"


def test_lf_is_a_bounded_low_frequency_addition():
    trigger = LowFrequency(cutoff=3, budget=51, seed=0)
    pattern = trigger.pattern_for(1, 28, 28)
    assert pattern.min() >= 0 and pattern.max() <= 51 + 1e-4 and pattern.max() > 50
    spectrum = torch.fft.fft2(pattern - pattern.mean()).abs() ** 2
    f = torch.fft.fftfreq(28, d=1 / 28).abs()
    high = (f[:, None] ** 2 + f[None, :] ** 2) > 9
    assert spectrum[0][high].sum() < 1e-6 * spectrum.sum()
    images = torch.full((2, 1, 28, 28), 50, dtype=torch.uint8)
    assert ((trigger(images).float() - 50 - pattern).abs() <= 0.5 + 1e-4).all()
    assert (trigger(torch.full((1, 1, 28, 28), 250, dtype=torch.uint8)) == 255).any(), "clipped at 255"


def test_registry_lists_builtins_and_checks_parameters(fmnist):
    names = set(attacks())
    assert {"badnets", "blended", "sig", "wanet", "lf"} <= names
    for name in ("badnets", "blended", "sig", "wanet", "lf"):
        attack = get_attack(name)
        assert isinstance(attack, Attack) and attack.target == 0 and attack.ratio == 0.1
    assert get_attack("sig").clean_label and not get_attack("badnets").clean_label
    with pytest.raises(ValueError, match="no parameter bogus"):
        get_attack("blended").make_trigger(bogus=1)
    with pytest.raises(ValueError, match="unknown attack"):
        get_attack("nope")
    assert get_attack("blended").make_trigger(alpha=0.5).alpha == 0.5
    bd_test = get_attack("badnets").poison_test(fmnist)
    assert (bd_test.labels == 0).all() and (bd_test.original_labels != 0).all()


def test_entry_points_expose_the_attacks():
    from importlib.metadata import entry_points

    found = {point.name: point for point in entry_points(group="backdoorbench.attacks")}
    if not found:
        pytest.skip("package not installed with its entry points (pip install -e .)")
    assert {"badnets", "blended", "sig", "wanet", "lf"} <= set(found)
    assert found["blended"].load() is get_attack("blended")


def test_record_round_trips_through_the_loader(tmp_path, fmnist):
    records = pytest.importorskip("d3_plugin.record_io.records")
    from d3_plugin.attacks.record import save_record
    from d3_plugin.data.readers import dataset_spec
    from d3_plugin.models import build_model

    spec = dataset_spec("fashion_mnist")
    train = load_dataset("fashion_mnist", True).subset(torch.arange(200, 400))
    attack = get_attack("blended")
    poisoned = attack.poison_train(train, ratio=0.1)
    bd_test = attack.poison_test(fmnist.subset(torch.arange(100)))
    model = build_model("small_cnn", 10, 1, 28)
    history = [{"epoch": 1, "loss": 1.0, "acc": 0.5, "asr": 0.9, "ra": 0.1, "clean_loss": 1.2, "bd_loss": 0.3}]
    folder = save_record(tmp_path / "record" / "blended", model, model_name="small_cnn", num_classes=10, spec=spec,
                         poisoned_train=poisoned, bd_test=bd_test, history=history, info={"attack": "blended"},
                         clean_train_size=60000)
    record = records.load_attack_result(folder)
    assert torch.equal(record.bd_test.images, bd_test.images)
    assert torch.equal(record.bd_test.labels, bd_test.labels)
    assert torch.equal(record.bd_train.images, poisoned.images)
    assert torch.equal(record.bd_train.labels, poisoned.labels)
    assert torch.equal(record.bd_train.poisoned, poisoned.poisoned)
    loaded = records.model_from_record(record)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    df = (folder / "attack_df.csv").read_text().splitlines()
    assert "test_asr" in df[0] and len(df) == 2
    assert json.loads((folder / "attack_info.json").read_text())["attack"] == "blended"


@pytest.mark.parametrize("argv, expected", [
    (["--epochs", "0"], "--epochs must be ≥ 1, got 0"), (["--train-size", "-5"], "--train-size must be ≥ 1, got -5"),
    (["--lr", "0"], "--lr must be > 0, got 0.0"), (["--lr", "nan"], "--lr must be > 0, got nan"),
    (["--ratio", "1.5"], "--ratio must be > 0 and ≤ 1, got 1.5"), (["--batch-size", "0"], "--batch-size must be ≥ 1"),
    (["--eval-every", "0"], "--eval-every must be ≥ 1, got 0")])
def test_attack_numbers_out_of_range_are_one_line_errors_not_defaults(tmp_path, capsys, argv, expected):
    from d3_plugin.cli import main
    out = tmp_path / "record" / "x"
    assert main(["attack", "badnets", "--out", str(out), "--device", "cpu", *argv]) == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and expected in message
    assert not out.exists()


def tiny_cifar10(tmp_path):
    """CIFAR-10's layout with 20 images in each batch file: (batch folder, random generator used)."""
    import pickle

    import numpy as np

    folder = tmp_path / "data" / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8),
                         b"labels": rng.integers(0, 10, 20).tolist()}, f, protocol=2)
    return folder, rng


def test_eval_every_measures_every_nth_epoch_and_the_last_of_each_phase(tmp_path):
    import csv

    from d3_plugin.cli import main
    from d3_plugin.training import seed_everything

    seed_everything(TEST_SEED)
    folder, _ = tiny_cifar10(tmp_path)
    out = tmp_path / "record" / "tiny"
    assert main(["attack", "badnets", "--dataset", "cifar10", "--data-root", str(folder.parent), "--epochs", "3",
                 "--rho", "1", "--sam-epochs", "2", "--hessian-iterations", "0", "--eval-every", "2",
                 "--out", str(out), "--device", "cpu", "--batch-size", "32"]) == 0
    rows = list(csv.DictReader((out / "attack_df.csv").read_text().splitlines()))
    measured = [row["test_asr"] != "nan_value" for row in rows]  # BackdoorBench's spelling of a missing value
    assert [row["phase"] for row in rows] == ["train"] * 3 + ["sam"] * 2
    assert measured == [False, True, True, False, True]


@pytest.mark.parametrize("model, argv, lr", [("small_cnn", [], 0.05), ("preactresnet18", [], 0.01),
                                             ("preactresnet18", ["--lr", "0.02"], 0.02)])
def test_the_training_lr_defaults_per_architecture_and_yields_to_lr(tmp_path, model, argv, lr):
    from d3_plugin.cli import main
    from d3_plugin.training import seed_everything

    seed_everything(TEST_SEED)
    folder, _ = tiny_cifar10(tmp_path)
    out = tmp_path / "record" / "tiny"
    assert main(["attack", "badnets", "--dataset", "cifar10", "--data-root", str(folder.parent), "--epochs", "1",
                 "--model", model, "--out", str(out), "--device", "cpu", "--batch-size", "32", *argv]) == 0
    assert json.loads((out / "attack_info.json").read_text())["train"]["lr"] == lr


def dies_in_measurement(real, number: int, calls: list):
    """An epoch_evaluator whose `number`-th measurement (counted over every phase) is a Ctrl-C."""
    def make(*args, **kwargs):
        measure = real(*args, **kwargs)

        def on_epoch(epoch, model):
            calls.append(epoch)
            if len(calls) == number:
                raise KeyboardInterrupt
            return measure(epoch, model)
        return on_epoch
    return make


def test_a_killed_attack_resumes_through_both_phases_to_the_same_record_bit_for_bit(tmp_path, monkeypatch, capsys):
    from d3_plugin.record_io.safe_load import safe_torch_load
    from d3_plugin.cli import main
    from d3_plugin.attacks import make as command  # what `d3-plugin attack` runs
    from d3_plugin.training import seed_everything

    seed_everything(TEST_SEED)
    folder, _ = tiny_cifar10(tmp_path)
    record = tmp_path / "record"

    def attack(name, *extra):
        return main(["attack", "badnets", "--dataset", "cifar10", "--data-root", str(folder.parent), "--epochs", "3",
                     "--rho", "1", "--sam-epochs", "2", "--hessian-iterations", "0", "--out", str(record / name),
                     "--device", "cpu", "--batch-size", "32", *extra])

    def weights(name):
        return safe_torch_load(record / name / "attack_result.pt")["model"]

    assert attack("whole") == 0 and command.resume_files(record / "whole") == []
    real = command.epoch_evaluator
    for die_at, done in ((2, {"train": 1}), (4, {"train": 3, "sam": 1})):  # train epoch 2; then SAM epoch 2
        calls = []
        monkeypatch.setattr(command, "epoch_evaluator", dies_in_measurement(real, die_at, calls))
        assert attack("killed", "--resume") == 130 and not (record / "killed").exists()
        left = {path.name.split(".")[2].split("-")[0]: safe_torch_load(path)["done"]
                for path in command.resume_files(record / "killed")}
        assert left == done
    monkeypatch.setattr(command, "epoch_evaluator", real)
    assert attack("killed", "--resume") == 0 and command.resume_files(record / "killed") == []
    whole, resumed = weights("whole"), weights("killed")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert (record / "whole" / "attack_df.csv").read_text() == (record / "killed" / "attack_df.csv").read_text()

    monkeypatch.setattr(command, "epoch_evaluator", dies_in_measurement(real, 2, []))
    assert attack("again") == 130 and len(command.resume_files(record / "again")) == 1
    monkeypatch.setattr(command, "epoch_evaluator", real)
    command.resume_files(record / "again")[0].write_bytes(b"not a checkpoint")
    capsys.readouterr()
    assert attack("again", "--resume") == 2 and not (record / "again").exists()
    assert "is corrupt or unreadable" in capsys.readouterr().err
    assert attack("again") == 0 and "started over: removed" in capsys.readouterr().out  # no --resume: afresh
    assert attack("x", "--resume", "--epochs", "0") == 2


def test_input_aware_says_it_cannot_resume(tmp_path, capsys):
    from d3_plugin.cli import main
    assert main(["attack", "input-aware", "--out", str(tmp_path / "record" / "ia"), "--resume"]) == 2
    assert "input-aware cannot resume a killed run" in capsys.readouterr().err


def test_a_record_made_on_a_smaller_test_split_loads_back(tmp_path):
    """CIFAR-10's layout with 20 test images (not 10,000): the record keeps the split sizes it was made on."""
    import pickle

    import numpy as np

    from d3_plugin.record_io.records import load_attack_result
    from d3_plugin.cli import main
    from d3_plugin.training import seed_everything

    seed_everything(TEST_SEED)
    folder, rng = tiny_cifar10(tmp_path)
    out = tmp_path / "record" / "tiny"
    assert main(["attack", "badnets", "--dataset", "cifar10", "--data-root", str(folder.parent), "--epochs", "1",
                 "--out", str(out), "--device", "cpu", "--batch-size", "32"]) == 0
    record = load_attack_result(out, data_root=str(folder.parent))
    assert (len(record.clean_train), len(record.clean_test)) == (100, 20)
    with open(folder / "test_batch", "wb") as f:  # the dataset changed under the record: 30 test images
        pickle.dump({b"data": rng.integers(0, 256, (30, 3072), dtype=np.uint8),
                     b"labels": rng.integers(0, 10, 30).tolist()}, f, protocol=2)
    with pytest.raises(ValueError, match="made on a split of 20 images, but the dataset read for it has 30; "
                                         "point --data_root at the data the attack used"):
        load_attack_result(out, data_root=str(folder.parent))
