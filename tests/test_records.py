"""BackdoorBench record I/O: writer -> loader round trip on real Fashion-MNIST, safe loading, bad input."""
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from d3_plugin.attacks.badnets import BadNets
from d3_plugin.attacks.base import poison_test_set, poison_training_set
from d3_plugin.record_io.records import (AttackRecord, load_attack_result, load_model_checkpoint,
                                             model_from_record, write_attack_record, write_defense_result)
from d3_plugin.record_io.safe_load import CheckpointError, UnsafeCheckpoint, safe_torch_load
from d3_plugin.data import load_dataset
from d3_plugin.data.readers import DatasetNotFound, load_gtsrb, load_tiny
from d3_plugin.models import build_model

from conftest import TEST_SEED


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A record written by us: 300 training / 200 test Fashion-MNIST images, BadNets, target 0."""
    checkout = tmp_path_factory.mktemp("checkout")
    train = load_dataset("fashion_mnist", True).subset(torch.arange(0, 60000, 200))
    test = load_dataset("fashion_mnist", False).subset(torch.arange(0, 10000, 50))
    bd_train = poison_training_set(train, BadNets(), 0.1, 0)
    bd_test = poison_test_set(test, BadNets(), 0)
    torch.manual_seed(TEST_SEED)
    model = build_model("small_cnn", 10, 1, 28)
    folder = write_attack_record(checkout / "record" / "badnet_fm", model_name="small_cnn", num_classes=10,
                                 state_dict=model.state_dict(), dataset="fashion_mnist",
                                 data_path="./data/fashion_mnist", img_size=[28, 28, 1], bd_train=bd_train,
                                 bd_test=bd_test)
    return {"checkout": checkout, "folder": folder, "bd_train": bd_train, "bd_test": bd_test, "model": model}


@pytest.fixture(scope="module")
def record(made):
    return load_attack_result(made["folder"])


def _same(a, b):
    return (torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
            and torch.equal(a.original_labels, b.original_labels) and torch.equal(a.poisoned, b.poisoned)
            and torch.equal(a.source_index, b.source_index))


def test_round_trip(made, record):
    assert isinstance(record, AttackRecord)
    assert record.folder == made["folder"].resolve() and record.checkout_root == made["checkout"].resolve()
    assert (record.model_name, record.num_classes, record.dataset, record.img_size) == \
        ("small_cnn", 10, "fashion_mnist", (28, 28, 1))
    assert record.spec.channels == 1 and record.spec.size == 28
    assert len(record.clean_train) == 60000 and len(record.clean_test) == 10000
    assert _same(record.bd_test, made["bd_test"]) and bool(record.bd_test.poisoned.all())
    assert (record.bd_test.original_labels != 0).all() and (record.bd_test.labels == 0).all()
    assert _same(record.bd_train, made["bd_train"]) and int(record.bd_train.poisoned.sum()) == 30
    assert record.raw["bd_test"]["container_entries"] == len(made["bd_test"]) and "model" not in record.raw
    model = model_from_record(record)
    for key, value in made["model"].state_dict().items():
        assert torch.equal(model.state_dict()[key], value)


def test_disk_format_is_backdoorbench(made):
    folder = made["folder"]
    raw = safe_torch_load(folder / "attack_result.pt")
    assert set(raw) == {"model_name", "num_classes", "model", "data_path", "img_size", "clean_data",
                        "bd_train", "bd_test"}
    state = raw["bd_test"]
    assert set(state) == {"bd_data_container", "getitem_all", "getitem_all_switch", "original_index_array",
                          "poison_indicator", "save_folder_path"}
    assert state["original_index_array"].dtype == np.int64 and state["poison_indicator"].dtype == np.float64
    assert len(state["poison_indicator"]) == 10000 and state["getitem_all"] and not state["getitem_all_switch"]
    container = state["bd_data_container"]
    assert container["save_file_format"] == ".png"
    assert container["save_folder_path"] == "./record/badnet_fm/bd_test_dataset"
    key = int(state["original_index_array"][0])
    entry = container["data_dict"][key]
    bd_label, original = entry["other_info"]
    assert entry["path"] == f"./record/badnet_fm/bd_test_dataset/{original}/{key}.png" and bd_label == 0
    assert (made["checkout"] / entry["path"]).is_file()
    assert len(list((folder / "bd_train_dataset").rglob("*.png"))) == 30
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no staging or temp files left
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(folder / "attack_result.pt").st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def _rename_numpy_module(src: Path, dst: Path, old: bytes, new: bytes):
    dst.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert old in data
                data = data.replace(old, new)
            zout.writestr(info, data)


def test_numpy1_module_names_load(made, record):
    """A file written under numpy 1 names numpy.core.multiarray; it loads the same."""
    target = made["checkout"] / "record" / "numpy1" / "attack_result.pt"
    _rename_numpy_module(made["folder"] / "attack_result.pt", target, b"numpy._core.multiarray",
                         b"numpy.core.multiarray")
    with zipfile.ZipFile(target) as z:
        pickled = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    assert b"numpy.core.multiarray\n_reconstruct" in pickled and b"numpy._core" not in pickled
    again = load_attack_result(target, load_bd_train=False)
    assert _same(again.bd_test, record.bd_test) and again.bd_train is None


class _Hostile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_hostile_pickle_refused_without_side_effect(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "record" / "evil" / "attack_result.pt"
    path.parent.mkdir(parents=True)
    torch.save({"model_name": "small_cnn", "num_classes": 10, "model": {"w": torch.zeros(1)},
                "data_path": "./data/x", "img_size": [28, 28, 1], "clean_data": "fashion_mnist",
                "bd_train": None, "bd_test": _Hostile(marker)}, path)
    for load in (safe_torch_load, load_attack_result, load_model_checkpoint):
        with pytest.raises(UnsafeCheckpoint, match=r"refused: it needs (posix|os|nt)\.system") as info:
            load(path)
        assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "empty", "junk", "missing"])
def test_damaged_files(made, tmp_path, damage):
    path = tmp_path / "attack_result.pt"
    data = (made["folder"] / "attack_result.pt").read_bytes()
    content = {"truncated": data[: len(data) // 2], "empty": b"", "junk": b"not a checkpoint at all"}.get(damage)
    if content is not None:
        path.write_bytes(content)
    error = FileNotFoundError if damage == "missing" else CheckpointError
    with pytest.raises(error) as info:
        load_attack_result(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_checkpoint_kinds_and_module_prefix(made, tmp_path):
    state = made["model"].state_dict()
    defense = write_defense_result(tmp_path / "defense_result.pt", "small_cnn", 10, state)
    raw = torch.load(defense, weights_only=True)
    assert set(raw) == {"model_name", "num_classes", "model"} and all(v.device.type == "cpu"
                                                                       for v in raw["model"].values())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "bare.pt")
    torch.save({"model_state_dict": state}, tmp_path / "wrapped.pt")
    for path, expected in ((defense, ("small_cnn", 10)), (made["folder"] / "attack_result.pt", ("small_cnn", 10)),
                           (tmp_path / "bare.pt", (None, None)), (tmp_path / "wrapped.pt", (None, None))):
        name, classes, loaded = load_model_checkpoint(path)
        assert (name, classes) == expected and list(loaded) == list(state)
        model = model_from_record((name, classes, loaded), model_name="small_cnn")
        assert torch.equal(model.state_dict()["linear.weight"], state["linear.weight"])
    with pytest.raises(ValueError, match="model name"):
        model_from_record(load_model_checkpoint(tmp_path / "bare.pt"))


def test_model_mismatches(made):
    state = made["model"].state_dict()
    with pytest.raises(ValueError, match="class count mismatch"):
        model_from_record(("small_cnn", 43, state))
    with pytest.raises(ValueError, match=r"do not match preactresnet18: missing \['conv1.weight'"):
        model_from_record(("preactresnet18", 10, state))
    with pytest.raises(ValueError, match="unknown model"):
        model_from_record(("no_such_net", 10, state))
    renamed = {f"renamed_{i}": v for i, v in enumerate(state.values())}  # names differ, shapes align
    model = model_from_record(("small_cnn", 10, renamed))
    assert torch.equal(model.state_dict()["linear.bias"], state["linear.bias"])


def test_moved_record_and_missing_png(made, tmp_path):
    moved = tmp_path / "record" / "renamed"
    shutil.copytree(made["folder"], moved)
    record = load_attack_result(moved, load_bd_train=False)  # stored ./record/badnet_fm/... paths are gone here
    assert len(record.bd_test) == len(made["bd_test"])
    next((moved / "bd_test_dataset").rglob("*.png")).unlink()
    with pytest.raises(DatasetNotFound, match="poisoned sample .*not found.*copy the record"):
        load_attack_result(moved, load_bd_train=False)


def test_missing_dataset_folder(made, tmp_path):
    folder = tmp_path / "record" / "cifar"
    write_attack_record(folder, model_name="preactresnet18", num_classes=10,
                        state_dict=build_model("preactresnet18", 10).state_dict(), dataset="cifar10",
                        data_path="./data/cifar10", img_size=[32, 32, 3], bd_train=None,
                        bd_test=_rgb_bd_test(4))
    with pytest.raises(DatasetNotFound, match=r"data/cifar10 .*does not exist.*data_root") as info:
        load_attack_result(folder)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="record/<name>"):
        write_attack_record(tmp_path / "elsewhere", model_name="x", num_classes=10, state_dict={},
                            dataset="cifar10", data_path="./data/cifar10", img_size=[32, 32, 3], bd_train=None,
                            bd_test=_rgb_bd_test(1))


def _rgb_bd_test(n):
    from d3_plugin.data import ImageSet
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    return ImageSet(images, torch.zeros(n, dtype=torch.long), torch.arange(1, n + 1) % 10,
                    torch.ones(n, dtype=torch.bool), torch.arange(n) * 7)


def test_in_memory_container(made, record, tmp_path):
    """BackdoorBench's in-RAM mode: data_dict values are (PIL image, bd_label, original_label)."""
    raw = safe_torch_load(made["folder"] / "attack_result.pt")
    data_dict = raw["bd_test"]["bd_data_container"]["data_dict"]
    for key, entry in data_dict.items():
        with Image.open(made["checkout"] / entry["path"]) as image:
            data_dict[key] = (image.copy(), *entry["other_info"])
    raw["bd_test"]["bd_data_container"]["save_folder_path"] = None
    raw["bd_train"] = None
    target = made["checkout"] / "record" / "in_memory" / "attack_result.pt"
    target.parent.mkdir()
    torch.save(raw, target)
    assert "PIL.Image.Image" in torch.serialization.get_unsafe_globals_in_checkpoint(target)
    assert _same(load_attack_result(target).bd_test, record.bd_test)


def test_gtsrb_and_tiny_readers(tmp_path):
    rng = np.random.default_rng(0)

    def image(path, size):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)

    header = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"
    for c in range(43):
        folder = tmp_path / "gtsrb" / "Train" / f"{c:05d}"
        image(folder / "00000_00000.ppm", (40 + c, 35))
        (folder / f"GT-{c:05d}.csv").write_text(header + f"00000_00000.ppm;{40 + c};35;1;1;30;30;{c}\n")
    image(tmp_path / "gtsrb" / "Test" / "00000.ppm", (50, 61))
    (tmp_path / "gtsrb" / "Test" / "GT-final_test.csv").write_text(header + "00000.ppm;50;61;1;1;30;30;7\n")
    train, test = load_gtsrb(True, tmp_path / "gtsrb"), load_gtsrb(False, tmp_path / "gtsrb")
    assert train.images.shape == (43, 3, 32, 32) and train.labels.tolist() == list(range(43))
    assert test.images.shape == (1, 3, 32, 32) and test.labels.tolist() == [7]

    base = tmp_path / "tiny" / "tiny-imagenet-200"
    for wnid in ("n02", "n01"):
        for i in (1, 0):
            image(base / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", (64, 64))
    image(base / "val" / "images" / "val_0.JPEG", (64, 64))
    image(base / "val" / "images" / "val_1.JPEG", (64, 64))
    (base / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn02\t0\t0\t1\t1\nval_1.JPEG\tn01\t0\t0\t1\t1\n")
    tiny_train, tiny_val = load_tiny(True, tmp_path / "tiny"), load_tiny(False, tmp_path / "tiny")
    assert tiny_train.labels.tolist() == [0, 0, 1, 1] and tiny_train.images.shape == (4, 3, 64, 64)
    assert tiny_val.labels.tolist() == [0, 1]  # val_1 is n01 (class 0), val_0 is n02
    with pytest.raises(DatasetNotFound, match="GT-final_test.csv"):
        load_gtsrb(False, tmp_path / "nowhere")


@pytest.mark.parametrize("name,classes", [("squeezenet1_0", 7), ("small_cnn", 7), ("preactresnet18", 7)])
def test_class_count_comes_from_the_head_even_with_several_default_layers(name, classes):
    """small_cnn's θs start with a conv and `fc` (64 outputs); SqueezeNet's head is a conv."""
    from d3_plugin.record_io.records import _infer_num_classes
    with torch.device("meta"):
        state = build_model(name, classes, 3, 32).state_dict()
    assert _infer_num_classes(name, state) == classes


def test_a_checkpoint_with_non_finite_weights_is_refused_in_one_line():
    torch.manual_seed(TEST_SEED)
    state = build_model("small_cnn", 10, 1, 28).state_dict()
    state["linear.weight"] = torch.full_like(state["linear.weight"], float("nan"))
    with pytest.raises(ValueError, match=r"non-finite values in 1 tensor\(s\) \(first: linear.weight\); the training "
                                         r"that made it diverged") as error:
        model_from_record(("small_cnn", 10, state))
    assert "\n" not in str(error.value)


def test_a_data_root_the_user_names_is_used_or_refused_never_replaced_by_the_system_copy(made, tmp_path):
    """Without data_root the checkout has no Fashion-MNIST and the Debian copy is used; a named one must hold it."""
    assert len(load_attack_result(made["folder"], load_bd_train=False).clean_test) == 10000
    with pytest.raises(DatasetNotFound, match=r"nonexistent .*does not exist") as info:
        load_attack_result(made["folder"], data_root=tmp_path / "nonexistent", load_bd_train=False)
    assert "\n" not in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFound, match=r"FashionMNIST train idx files not found in .*empty"):
        load_attack_result(made["folder"], data_root=tmp_path / "empty", load_bd_train=False)
