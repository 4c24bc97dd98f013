"""benchmarks/reproduction_table.py: the ranking beside the paper's, on made-up grid rows."""
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduction_table.py"


@pytest.fixture(scope="module")
def reproduction_table():
    spec = importlib.util.spec_from_file_location("reproduction_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rows_with_average_asr(module, asr_by_defense: dict) -> list:
    return [{"record": attack, "defense": defense, "acc": 0.9, "asr": asr, "der": 0.5}
            for defense, asr in asr_by_defense.items() for attack in module.ATTACKS]


def test_ranks_share_the_mean_rank_on_ties(reproduction_table):
    assert reproduction_table.ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1, 3.5, 2]


def test_spearman_is_one_for_the_same_order_and_minus_one_for_the_reverse(reproduction_table):
    assert reproduction_table.spearman([1, 5, 9], [10, 20, 30]) == pytest.approx(1.0)
    assert reproduction_table.spearman([1, 5, 9], [30, 20, 10]) == pytest.approx(-1.0)


def test_ordering_ranks_only_defenses_with_every_attack_and_a_paper_average(reproduction_table):
    paper = reproduction_table.paper_numbers()
    rows = rows_with_average_asr(reproduction_table, {"d3": 0.01, "ft": 0.9, "ft-sam": 0.4, "nad": 0.2})
    rows += [{"record": "badnets", "defense": "fst", "acc": 0.9, "asr": 0.0, "der": 0.5}]  # one attack only
    text = reproduction_table.ordering(rows, paper)
    ranked = [line.split("|")[1].strip() for line in text.splitlines()[2:] if line.startswith("|")]
    assert ranked == ["d3", "nad", "ft-sam", "ft"]
    assert "over 4 defenses" in text


def test_ordering_says_so_when_too_few_defenses_can_be_ranked(reproduction_table):
    rows = rows_with_average_asr(reproduction_table, {"d3": 0.01, "ft": 0.9})
    assert reproduction_table.ordering(rows, reproduction_table.paper_numbers()) == \
        "too few defenses in both tables to rank"
