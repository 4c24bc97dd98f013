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


def test_table5_sets_the_record_itself_and_each_defense_beside_the_papers_rho3_numbers(reproduction_table):
    rows = [{"record": record, "defense": defense, "acc": 0.8, "asr": asr}
            for record in ("badnets", "flat-badnets-rho3") for defense, asr in
            (("no defense", 0.9), ("ft", 0.5), ("ft-sam", 0.3), ("d3", 0.02))]
    lines = reproduction_table.table5(rows, reproduction_table.paper_numbers()).splitlines()
    assert lines[0].split("|")[2].strip() == "no defense"
    plain, flat = [[c.strip() for c in line.split("|")[1:-1]] for line in lines[2:]]
    assert plain[:2] == ["badnets", "80.0 / 90.0"] and plain[5:] == ["–", "–", "–"]
    assert flat[4] == "80.0 / 2.0" and flat[5:] == ["92.55 / 71.24", "92.19 / 54.79", "91.53 / 1.24"]


def test_beside_paper_gives_each_cell_its_spread_over_seeds_and_the_papers_number(reproduction_table):
    rows = [{"record": "blended-preact", "defense": "d3", "acc": 0.8, "acc_std": 0.01, "asr": 0.2,
             "asr_std": 0.3, "asr_min": 0.003, "asr_max": 0.5571, "der": 0.9, "der_std": 0.1},
            {"record": "blended-preact", "defense": "ft", "acc": 0.85, "asr": 0.99, "der": 0.5}]
    text = reproduction_table.beside_paper(rows, reproduction_table.paper_numbers(), "1", ["blended-preact"],
                                           ["ft", "d3", "fst"])
    header, _, ft, d3 = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines()]
    assert header[4] == "ASR min–max"
    assert d3[2:6] == ["80.0 ± 1.0", "20.0 ± 30.0", "0.3–55.7", "90.0 ± 10.0"]
    assert ft[4] == "–"  # no spread given: not made up
    assert d3[6] == "92.29 / 0.22 / 99.26" and ft[6] == "92.78 / 96.11"
