"""`d3-plugin demo`: BadNets on Fashion-MNIST, then FT and D3 with the same budget."""
from __future__ import annotations

from ..demo import DemoConfig, run_demo

NAME = "demo"
HELP = "plant a BadNets backdoor in Fashion-MNIST and remove it with FT and D3; print and save the table"
DEFAULTS = DemoConfig()


def add_arguments(parser) -> None:
    parser.add_argument("--out", default=DEFAULTS.out, help=f"output folder (default: {DEFAULTS.out})")
    parser.add_argument("--data_root", "--data-root", dest="data_root", help="folder with the Fashion-MNIST idx files "
                        "(default: /usr/share/datasets/fashion-mnist)")
    parser.add_argument("--device", default=DEFAULTS.device, help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed)
    parser.add_argument("--epochs", type=int, default=None, help=f"defense epochs (default {DEFAULTS.defense_epochs})")
    parser.add_argument("--lr", type=float, default=None, help=f"defense learning rate (default {DEFAULTS.defense_lr})")
    parser.add_argument("--attack-epochs", type=int, default=None,
                        help=f"backdoor training epochs (default {DEFAULTS.attack.epochs})")
    parser.add_argument("--train-size", type=int, default=None, help="use a random subset of the training set")
    defenses = ",".join(DEFAULTS.defenses)
    parser.add_argument("--defenses", default=defenses, help=f"comma-separated registry names (default {defenses})")


def run(args) -> int:
    config = DemoConfig(out=args.out, data_root=args.data_root, device=args.device, seed=args.seed,
                        train_size=args.train_size, defenses=tuple(n.strip() for n in args.defenses.split(",")))
    if args.epochs is not None:
        config.defense_epochs = args.epochs
    if args.lr is not None:
        config.defense_lr = args.lr
    if args.attack_epochs is not None:
        config.attack.epochs = args.attack_epochs
    run_demo(config)
    return 0
