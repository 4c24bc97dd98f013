"""Result files: JSON is always strict."""
import json
import math

from d3_plugin.files import write_json


def test_write_json_writes_non_finite_numbers_as_null_so_any_strict_parser_reads_it(tmp_path):
    path = write_json(tmp_path / "summary.json", {"der": float("nan"), "curve": [1.0, float("inf")],
                                                   "nested": {"acc": -math.inf, "asr": 0.25}})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text

    def refuse(constant):
        raise ValueError(f"non-strict JSON constant {constant}")
    data = json.loads(text, parse_constant=refuse)
    assert data == {"der": None, "curve": [1.0, None], "nested": {"acc": None, "asr": 0.25}}
