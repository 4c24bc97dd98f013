"""Resume after a kill: fit (and detoxify through it) save their state after every epoch and a resumed run
ends bit-identical to an uninterrupted one; a checkpoint of another run, or a corrupt one, is refused."""
import math
import random

import numpy as np
import pytest
import torch

from d3_plugin.record_io.safe_load import safe_torch_load
from d3_plugin.d3 import D3Config, detoxify
from d3_plugin.data import DatasetSpec, ImageSet, Loader
from d3_plugin.files import torch_save, write_bytes
from d3_plugin.d3_targets import default_layers
from d3_plugin.models import build_model
from d3_plugin.training import (EpochCheckpoint, cosine, cross_entropy, fit, seed_everything, sgd, train_classifier,
                                train_epoch)

from conftest import TEST_SEED

EPOCHS, KILLED_IN = 4, 3  # on_epoch of epoch 3 raises: the checkpoint then holds epochs 1–2
SPEC = DatasetSpec("random", 10, 1, 28, (0.5,), (0.5,), crop_padding=2, horizontal_flip=True)

pytestmark = [pytest.mark.trained, pytest.mark.usefixtures("suite_threads")]


def images(n=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8),
                    torch.randint(0, 10, (n,), generator=g))


def loader(batch_size=32, n=128):
    return Loader(images(n), SPEC, batch_size, train=True, seed=0)  # shuffling + augmentation draw per epoch


def input_model(seed=TEST_SEED):
    seed_everything(seed)
    return build_model("small_cnn", 10, 1, 28)


def evaluation(kill_in=None):
    """An on_epoch that draws from every global RNG (so they must be restored) and can simulate a kill."""
    def on_epoch(epoch, model):
        if epoch == kill_in:
            raise KeyboardInterrupt
        return {"torch": torch.rand(()).item(), "numpy": float(np.random.rand()), "random": random.random()}
    return on_epoch


def train(checkpoint=None, kill_in=None, epochs=EPOCHS):
    model = input_model()
    optimizer = sgd(model.parameters(), 0.05)
    history = fit(model, loader(), optimizer, cross_entropy(), epochs, scheduler=cosine(optimizer, epochs),
                  on_epoch=evaluation(kill_in), checkpoint=checkpoint)
    return model, history


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def killed_then_resumed(run, path):
    """`run(kill_in)` killed in epoch KILLED_IN, then resumed from the checkpoint in a scrambled process."""
    with pytest.raises(KeyboardInterrupt):
        run(KILLED_IN)
    stored = safe_torch_load(path)
    assert stored["done"] == KILLED_IN - 1 and len(stored["history"]) == KILLED_IN - 1
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # atomic write: no temporary left
    seed_everything(123)  # a fresh process: the checkpoint, not the seed, must restore every RNG
    return run(None)


def test_fit_resumed_after_a_kill_is_bit_identical(tmp_path):
    reference, expected = train()
    path = tmp_path / "fit.ckpt"
    model, history = killed_then_resumed(lambda kill_in: train(EpochCheckpoint(path, {"run": "a"}), kill_in), path)
    assert_same_weights(model, reference)
    assert history == expected and [row["epoch"] for row in history] == [1, 2, 3, 4]

    def never(epoch, m):
        raise AssertionError("a finished run must not train or evaluate again")
    again = input_model(5)
    optimizer = sgd(again.parameters(), 0.05)
    assert fit(again, loader(), optimizer, cross_entropy(), EPOCHS, on_epoch=never, scheduler=cosine(optimizer, EPOCHS),
               checkpoint=EpochCheckpoint(path, {"run": "a"})) == expected
    assert_same_weights(again, reference)


def test_sam_through_train_classifier_resumes_bit_identically_on_plain_batches(tmp_path):
    """A list of tensor batches (no loader generator) and SAM, whose base optimizer holds the state."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    torch.manual_seed(TEST_SEED)
    start = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    settings = dict(epochs=EPOCHS, lr=0.1, sam_rho=0.05)

    def run(kill_in, checkpoint=None):
        seed_everything(TEST_SEED)
        return train_classifier(start, batches, on_epoch=evaluation(kill_in), checkpoint=checkpoint, **settings)
    reference, expected = run(None)
    path = tmp_path / "sam.ckpt"
    model, history = killed_then_resumed(lambda kill_in: run(kill_in, EpochCheckpoint(path)), path)
    assert_same_weights(model, reference)
    assert history == expected


def test_grad_scaler_state_round_trips(tmp_path):
    """fit makes a GradScaler only for fp16 on CUDA; its state is saved and restored like the rest."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = sgd(model.parameters(), 0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1)
    batches = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(3)]
    train_epoch(model, batches, optimizer, cross_entropy(), scaler=scaler)
    checkpoint = EpochCheckpoint(tmp_path / "scaler.ckpt")
    checkpoint.save(2, model, optimizer, None, scaler, batches, [{"epoch": 1}])
    fresh = torch.amp.GradScaler("cpu", growth_interval=1)
    assert checkpoint.restore(2, model, optimizer, None, fresh, batches) == [{"epoch": 1}]
    assert fresh.state_dict() == scaler.state_dict() and fresh.get_scale() == 2.0 ** 13


def d3_config(epochs=EPOCHS):
    return D3Config(epochs=epochs, batch_size=32, layers=default_layers("small_cnn"), lr=0.02)


def purify(checkpoint=None, kill_in=None, model_seed=TEST_SEED, epochs=EPOCHS):
    config = d3_config(epochs)
    return detoxify(input_model(model_seed), loader(config.batch_size), config, on_epoch=evaluation(kill_in),
                    checkpoint=checkpoint)


def test_detoxify_resumed_after_a_kill_is_bit_identical(tmp_path):
    reference, expected = purify()
    path = tmp_path / "d3.ckpt"
    model, history = killed_then_resumed(lambda kill_in: purify(path, kill_in), path)
    assert_same_weights(model, reference)
    assert history == expected


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    path = tmp_path / "d3.ckpt"
    _, expected = purify(path, epochs=1)
    with pytest.raises(ValueError, match=r"belongs to another run \(its extra\['theta_init'\]\['features.4.0.weight'\] "
                                         r"differs.*delete it to start over or drop --resume"):
        purify(path, model_seed=TEST_SEED + 1, epochs=1)
    with pytest.raises(ValueError, match=r"is for a 1-epoch run, this run has 2 epochs; delete it"):
        purify(path, epochs=2)
    config = d3_config(1)
    config.lam = 2.0
    with pytest.raises(ValueError, match=r"its extra\['settings'\]\['lam'\] differs"):
        detoxify(input_model(), loader(), config, checkpoint=path)
    assert purify(path, epochs=1)[1] == expected  # the matching run still resumes (finished: nothing to do)
    fit_path = tmp_path / "fit.ckpt"
    train(EpochCheckpoint(fit_path, {"tag": torch.zeros(2)}), epochs=1)
    with pytest.raises(ValueError, match=r"its extra\['tag'\] differs"):
        train(EpochCheckpoint(fit_path, {"tag": torch.ones(2)}), epochs=1)


def test_a_d3_checkpoint_resumes_where_the_norms_round_otherwise(tmp_path, monkeypatch):
    """A checkpoint written on another device (a GPU's norm of θs_init may differ from the CPU's in the last
    bit) resumes: the run is identified by θs_init itself, compared on the CPU, not by norms of it."""
    path = tmp_path / "d3.ckpt"
    with pytest.raises(KeyboardInterrupt):
        purify(path, KILLED_IN)
    done = safe_torch_load(path)["history"]
    vector_norm = torch.linalg.vector_norm
    monkeypatch.setattr(torch.linalg, "vector_norm", lambda *a, **k: torch.nextafter(vector_norm(*a, **k),
                                                                                     torch.tensor(math.inf)))
    model, history = purify(path)
    assert history[:KILLED_IN - 1] == done and len(history) == EPOCHS


@pytest.mark.parametrize("content, message", [
    (b"not a checkpoint at all", "is corrupt or unreadable"),
    (b"", "is corrupt or unreadable"),
    ("truncated", "is corrupt or unreadable"),
    ({"weights": torch.zeros(2)}, "is not a complete d3_plugin epoch checkpoint"),
    ({"format": "d3_plugin.epoch_checkpoint/1", "when": __import__("datetime").date(2025, 1, 1)},
     "is corrupt or unreadable"),  # a global outside the safe allow-list: refused, never unpickled
])
def test_a_corrupt_checkpoint_is_a_one_line_error_naming_the_file(tmp_path, content, message):
    path = tmp_path / "bad.ckpt"
    if content == "truncated":
        train(EpochCheckpoint(path), epochs=1)
        data = path.read_bytes()
        write_bytes(path, data[:len(data) // 2])
    elif isinstance(content, bytes):
        write_bytes(path, content)
    else:
        torch_save(content, path)
    with pytest.raises(ValueError, match=message) as error:
        train(EpochCheckpoint(path), epochs=1)
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    assert "delete it to start over or drop --resume" in str(error.value)
