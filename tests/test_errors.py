"""One mapping of input errors to one line and status 2, shared by `d3-plugin …` and the installed scripts."""
import pickle

import pytest
import torch

from d3_plugin.cli import main


def run(capsys, *argv):
    status = main([str(a) for a in argv])
    return status, capsys.readouterr().err.strip()


@pytest.mark.parametrize("argv, expected", [
    (["attack", "badnets", "--param", "size=[1, 2"], "invalid YAML"),
    (["attack", "badnets", "--device", "tpu", "--epochs", "1"], "unknown device 'tpu'; use auto, cpu, cuda"),
    (["compare", "--result_file", "no_such_record", "--set", "d3.lam=[oops"], "invalid YAML"),
    (["compare", "--result_file", "no_such_record", "--defenses", "d3,nope"], "unknown defense 'nope'; known: "),
    (["compare", "--result_file", "no_such_record", "--defenses", "bb:nope"], "unknown defense 'nope'"),
])
def test_bad_options_are_one_line_with_status_2(tmp_path, capsys, argv, expected):
    if argv[0] == "attack":
        argv = [*argv, "--out", tmp_path / "record" / "x"]
    status, message = run(capsys, *argv)
    assert status == 2 and "\n" not in message and expected in message


def test_a_damaged_cifar_batch_is_one_line(tmp_path, capsys):
    from d3_plugin.data.readers import load_cifar
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps({"data": 1})[:5])  # truncated pickle
    from d3_plugin.errors import INPUT_ERRORS, one_line
    with pytest.raises(INPUT_ERRORS) as error:
        load_cifar(True, tmp_path)
    assert "\n" not in one_line(error.value)


def test_a_record_whose_model_is_not_a_state_dict_is_refused(tmp_path):
    from d3_plugin.record_io.records import load_attack_result
    from d3_plugin.record_io.safe_load import CheckpointError
    folder = tmp_path / "record" / "bad"
    folder.mkdir(parents=True)
    keys = ("model_name", "num_classes", "model", "data_path", "img_size", "clean_data", "bd_train", "bd_test")
    fields = {k: None for k in keys} | {"model": "not weights", "model_name": "small_cnn", "num_classes": 10}
    torch.save(fields, folder / "attack_result.pt")
    with pytest.raises(CheckpointError, match=r"its `model` is a str, not a state_dict of tensors"):
        load_attack_result(folder)


def test_compare_refuses_a_misspelt_hyper_parameter_before_running_anything(capsys):
    status, message = run(capsys, "compare", "--result_file", "no_such_record", "--set", "d3.lamda=1")
    assert status == 2 and "\n" not in message
    assert "--set: d3: unknown hyper-parameter(s) lamda; valid: " in message and "lam" in message
    status, message = run(capsys, "compare", "--result_file", "no_such_record", "--set", "nosuch.x=1")
    assert status == 2 and "unknown defense 'nosuch'" in message
