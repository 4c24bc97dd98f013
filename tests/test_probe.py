"""The test-free backdoor probe on the shared backdoored small CNN (conftest.py): BadNets, target 0."""
import pytest
import torch

from d3_plugin.d3 import D3Config, detoxify
from d3_plugin.data import Loader
from d3_plugin.adversarial import InputBox
from d3_plugin.d3_targets import default_layers
from d3_plugin.probe import ProbeConfig, backdoor_probe, class_scores, universal_perturbation

from conftest import observed

pytestmark = pytest.mark.trained  # see conftest.py

# Measured with PROBE on 200 held-out reserved images (fixture seeds 0–5 × threads 1–2): the backdoored model sends
# 96–100 % of them to the target class 0; after D3 (5 epochs) class 0 gets 0.35–0.92 less.
PROBE = ProbeConfig(eps=0.2, steps=10, step_size=0.04)


@pytest.fixture
def held_out(backdoored):
    return Loader(backdoored.reserved.subset(torch.arange(300, 500)), backdoored.spec, 200)


def test_the_target_class_is_the_easiest_to_reach_on_the_backdoored_model(backdoored, held_out):
    probe = backdoor_probe(backdoored.model, held_out, backdoored.spec, PROBE, classes=[0, 3, 7])
    assert probe["probe_class"] == 0, probe  # measured: target share 0.96–1, above the median by 0.27–0.76
    assert observed("probe: target share on the backdoored model", probe["probe"]) >= 0.9, probe
    assert observed("probe: target share − median share", probe["probe"] - probe["probe_median"]) > 0.2, probe


def test_the_probe_falls_after_d3_removes_the_backdoor(backdoored, held_out):
    config = D3Config(epochs=5, lr=0.1, batch_size=64, seed=0, layers=default_layers("small_cnn"))
    purified, _ = detoxify(backdoored.model, backdoored.reserved_batches(64, size=300), config)
    before = class_scores(backdoored.model, held_out, backdoored.spec, PROBE, classes=[0])[0]
    after = class_scores(purified, held_out, backdoored.spec, PROBE, classes=[0])[0]
    assert observed("probe: fall of the target share after d3", before - after) > 0.2, (before, after)  # 0.35–0.92


def test_the_universal_perturbation_stays_in_its_pixel_budget(backdoored, held_out):
    inputs, _ = next(iter(held_out))
    box = InputBox.from_spec(backdoored.spec)
    delta = universal_perturbation(backdoored.model, inputs[:20], 0, box, PROBE)
    assert delta.shape == (1, *inputs.shape[1:])
    assert (delta / box.scale).abs().max() <= PROBE.eps + 1e-6


def test_bad_probe_settings_are_rejected():
    with pytest.raises(ValueError, match="eps > 0"):
        ProbeConfig(eps=0)
