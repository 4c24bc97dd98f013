"""`d3-plugin demo`: BadNets on Fashion-MNIST, then FT and D3 with the same budget."""
from __future__ import annotations

NAME = "demo"
HELP = "plant a BadNets backdoor in Fashion-MNIST and remove it with FT and D3; print and save the table"


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    parser.add_argument("--data_root", "--data-root", dest="data_root", help="folder with the Fashion-MNIST idx files "
                        "(default: /usr/share/datasets/fashion-mnist)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None, help="defense epochs (default 60)")
    parser.add_argument("--lr", type=float, default=None, help="defense learning rate (default 0.03)")
    parser.add_argument("--attack-epochs", type=int, default=None, help="backdoor training epochs (default 6)")
    parser.add_argument("--train-size", type=int, default=None, help="use a random subset of the training set")
    parser.add_argument("--defenses", default="ft,d3", help="comma-separated registry names (default ft,d3)")


def run(args) -> int:
    from ..demo import DemoConfig, run_demo

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
