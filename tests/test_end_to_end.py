"""End to end on real Fashion-MNIST: the shared BadNets-backdoored small CNN (conftest.py), removed by D3.

D3 gets the 500 clean reserved images and small_cnn's default θs. Measured with this config over fixture
training seeds 0–2 × D3 seeds 0–1: ASR 0.015–0.068, ACC drop 0.11–0.16, RA 0.65–0.70 (from ≈ 0.01).
With θs = the Linear layers only, ASR reached 0.21: the small CNN keeps the trigger in its last conv block.
"""
import pytest

from d3_plugin import precision
from d3_plugin.d3 import D3Config, detoxify
from d3_plugin.evaluation import summarize
from d3_plugin.d3_targets import default_layers

from conftest import observed

pytestmark = pytest.mark.trained  # see conftest.py


def test_the_attack_plants_a_backdoor(backdoored):
    assert backdoored.before["asr"] >= 0.95, backdoored.before
    assert backdoored.before["acc"] >= 0.75, backdoored.before  # the clean task too (chance is 0.1)


@pytest.mark.parametrize("native_bf16", [True, False], ids=["bf16-cpu", "fp32-cpu"])
def test_d3_removes_the_backdoor_and_keeps_accuracy(backdoored, monkeypatch, native_bf16):
    """precision `auto` (D3's default) on both kinds of CPU, whatever this one is."""
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native_bf16)
    model, before = backdoored.model, backdoored.before
    config = D3Config(epochs=5, lr=0.1, batch_size=64, seed=0, layers=default_layers("small_cnn"))
    purified, history = detoxify(model, backdoored.reserved_batches(config.batch_size), config)
    after = backdoored.evaluate(purified)
    # measured (fixture seeds 0–5 × threads 1–2, both CPU branches; benchmarks/test_margins.py): ASR 0.002–0.095,
    # ACC drop 0.12–0.18 (5 short epochs; longer runs recover ACC), RA gain 0.59–0.70, DER 0.862–0.917
    claim = f"e2e d3 {'bf16' if native_bf16 else 'fp32'} CPU"
    assert observed(f"{claim}: ASR after", after["asr"]) < 0.15, after
    assert observed(f"{claim}: ACC drop", before["acc"] - after["acc"]) <= 0.25, (before, after)
    assert observed(f"{claim}: RA gain", after["ra"] - before["ra"]) > 0.3, (before, after)  # true classes come back
    assert observed(f"{claim}: DER", summarize(before, after)["der"]) > 0.8
    assert backdoored.evaluate(model) == before  # the input model is left as it was
    assert len(history) == 5 and history[-1]["clean_loss"] < history[0]["clean_loss"]
