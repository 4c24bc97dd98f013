"""`d3-plugin demo` end to end at toy scale on the real Fashion-MNIST: outputs, lr override, model cache."""
import json
from pathlib import Path

import pytest

from d3_plugin.demo import DemoConfig, run_demo

pytestmark = pytest.mark.trained  # see conftest.py

OUTPUTS = ("compare.md", "compare.csv", "compare.json", "compare.png", "curves.png")


@pytest.fixture
def config(tmp_path):
    demo = DemoConfig(out=str(tmp_path / "demo"), train_size=1500, defense_epochs=1, defense_lr=0.02,
                      curve_samples=200)
    demo.attack.epochs = 1
    return demo


def test_demo_end_to_end_then_from_the_model_cache(config, suite_threads, capsys):
    rows = run_demo(config)
    assert [row["defense"] for row in rows] == ["no defense", "ft", "d3"]
    for row in rows[1:]:
        assert not row["error"]
        assert row["history"][0]["lr"] == pytest.approx(config.defense_lr)  # first epoch of the cosine
        assert 0 <= row["asr"] <= 1 and 0 <= row["acc"] <= 1
    out = Path(config.out)
    assert all((out / name).stat().st_size > 0 for name in OUTPUTS)
    saved = json.loads((out / "compare.json").read_text())["rows"]
    assert [row["defense"] for row in saved] == ["no defense", "ft", "d3"]
    assert len(list((out / "cache").glob("backdoored_small_cnn_*.pt"))) == 1

    capsys.readouterr()
    config.defenses = ("d3",)
    again = run_demo(config)
    assert "using cached backdoored model" in capsys.readouterr().out
    assert (again[0]["acc"], again[0]["asr"]) == (rows[0]["acc"], rows[0]["asr"])
