"""`d3-plugin attack <name>`: train a backdoored model on CPU/GPU and save a BackdoorBench record;
`d3-plugin attack sam-flatten --result_file X`: flatten an existing record's backdoor with (A)SAM;
`d3-plugin attack input-aware`: train the input-aware dynamic backdoor (classifier + trigger generator).
The work is `attacks.make.make_record`; this module reads the command line into its `AttackSpec`."""
from __future__ import annotations

import argparse

from .. import registry
from ..attacks import MODEL_LR, TrainConfig
from ..attacks import input_aware as ia
from ..attacks.make import SPEC_FIELDS, AttackSpec, make_record
from ..attacks.registry import INPUT_AWARE, SAM_FLATTEN, attacks
from ..attacks.sam_flatten import FlattenConfig

NAME = "attack"
HELP = "train a backdoor attack (or SAM-flatten one) and save it as a BackdoorBench record folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("attack", help=f"attack name ({', '.join(sorted(attacks()))}, {INPUT_AWARE}) or "
                                       f"{SAM_FLATTEN}")
    parser.add_argument("--out", required=True, help="record folder to write: <checkout>/record/<name>")
    parser.add_argument("--dataset", default=AttackSpec.dataset)
    parser.add_argument("--data_root", "--data-root", dest="data_root", default=None,
                        help="folder holding the dataset files")
    parser.add_argument("--model", default=AttackSpec.model)
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"training epochs (default {TrainConfig.epochs}; sam-flatten {FlattenConfig.epochs}; "
                             f"input-aware {ia.InputAwareConfig.epochs})")
    parser.add_argument("--ratio", type=float, default=None,
                        help="poisoning ratio (default: the attack's, 0.1; input-aware: ρ_b of every batch)")
    parser.add_argument("--target", type=int, default=AttackSpec.target)
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="attack parameter, e.g. alpha=0.3 (repeatable; values parsed as YAML)")
    parser.add_argument("--train-size", type=int, default=None, help="train on a seeded subset of this size")
    per_model = "; ".join(f"{model} {lr}" for model, lr in MODEL_LR.items())
    parser.add_argument("--lr", type=float, default=None,
                        help=f"training lr (default {TrainConfig.lr}; {per_model}; sam-flatten {FlattenConfig.lr})")
    parser.add_argument("--batch-size", type=int, default=AttackSpec.batch_size)
    parser.add_argument("--seed", type=int, default=AttackSpec.seed)
    parser.add_argument("--device", default=AttackSpec.device)
    parser.add_argument("--eval-every", type=int, default=None,
                        help="measure ACC / ASR / RA on the test sets every N epochs and after the last (default 1; "
                             "each measurement costs about a training epoch on a large model)")
    parser.add_argument("--resume", action="store_true",
                        help="continue a killed run with the same options from its last finished epoch (every "
                             "attack but input-aware saves one after each epoch); without it a killed run's "
                             "checkpoint is removed and training starts over")
    sam = parser.add_argument_group("SAM flattening")
    sam.add_argument("--result_file", "--result-file", dest="result_file", default=None,
                     help="sam-flatten: the record folder (or its attack_result.pt) to flatten")
    sam.add_argument("--rho", "--sam-rho", dest="rho", type=float, default=None,
                     help="SAM radius (adaptive SAM: 1–3 as in the paper); with an attack name: flatten after "
                          "training")
    sam.add_argument("--sam-epochs", type=int, default=AttackSpec.sam_epochs, help="SAM epochs after training an attack")
    sam.add_argument("--plain-sam", action="store_true", help="plain SAM instead of adaptive SAM (ASAM)")
    sam.add_argument("--hessian-iterations", type=int, default=AttackSpec.hessian_iterations,
                     help="power iterations for the top Hessian eigenvalue (0: skip)")


def parse_params(pairs) -> dict:
    return dict(registry.parse_assignment(pair, "--param", "KEY=VALUE, e.g. alpha=0.3") for pair in pairs)


def parse_params(pairs) -> dict:
    return dict(registry.parse_assignment(pair, "--param", "KEY=VALUE, e.g. alpha=0.3") for pair in pairs)


def spec_of(args: argparse.Namespace) -> AttackSpec:
    """The command line's AttackSpec (`--param KEY=VALUE` read as YAML values)."""
    values = {name: getattr(args, name) for name in SPEC_FIELDS if name != "params"}
    return AttackSpec(**values, params=parse_params(args.param))


def run(args: argparse.Namespace) -> int:
    make_record(spec_of(args))
    return 0
