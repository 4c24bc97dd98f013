"""Issue 26: bad or degenerate inputs are refused in one line (exit 2) before any work, and failed runs leave
nothing behind. Fast: no training; every test builds what it needs in tmp_path."""
import pytest
import torch

from d3_plugin import registry
from d3_plugin.cli import main


def run(capsys, *argv):
    status = main([str(a) for a in argv])
    return status, capsys.readouterr().err.strip()


# --- 1. values torch cannot take ------------------------------------------------------------------------

@pytest.mark.parametrize("name, field", [("d3", "lr"), ("ft", "lr"), ("d3", "weight_decay"), ("i-bau", "pert_lr")])
def test_a_float_beyond_float32_is_refused(name, field):
    with pytest.raises(ValueError, match=rf"{field} 1e\+308 is beyond float32's range"):
        registry.build(name, **{field: 1e308})


def test_a_record_with_a_negative_class_count_is_refused(tmp_path):
    from d3_plugin.backdoorbench.records import load_attack_result
    from d3_plugin.backdoorbench.safe_load import CheckpointError
    folder = tmp_path / "record" / "bad"
    folder.mkdir(parents=True)
    keys = ("model_name", "num_classes", "model", "data_path", "img_size", "clean_data", "bd_train", "bd_test")
    weights = {"head.weight": torch.zeros(10, 4)}
    torch.save({k: None for k in keys} | {"model": weights, "model_name": "small_cnn", "num_classes": -3},
               folder / "attack_result.pt")
    with pytest.raises(CheckpointError, match=r"num_classes is -3, not an integer ≥ 2"):
        load_attack_result(folder)
