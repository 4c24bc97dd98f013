"""`d3-plugin analyze KIND`: the D3 paper's analyses on an attack record (or a compare table), each written as
a CSV and a PNG (interpolate: Fig. 2, weights: Fig. 4b, tsne: Fig. 4a, cost: Fig. 3). docs/analysis.md."""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from ..record_io.reserved import RESERVED_RATIO

NAME = "analyze"
HELP = ("the paper's analyses: loss/ACC/ASR along the line from the backdoored to the defended weights "
        "(interpolate), weight-change histograms FT vs D3 (weights), t-SNE of penultimate features (tsne), "
        "training cost relative to FT (cost); each writes a CSV and a PNG")
KINDS = ("interpolate", "weights", "tsne", "cost")
DEFAULT_DEFENSES = {"interpolate": "ft", "weights": "ft,d3", "tsne": "d3"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    record = argparse.ArgumentParser(add_help=False)
    record.add_argument("--result_file", help="attack record folder (record/<attack>) or its attack_result.pt")
    record.add_argument("--epochs", type=int, help="training epochs of every defense (default: each one's own)")
    record.add_argument("--ratio", type=float, default=RESERVED_RATIO, help="reserved clean fraction of the training set")
    record.add_argument("--seed", type=int, default=0,
                        help="seed of the reserved draw, the defenses, the sample subset and t-SNE (default 0)")
    record.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    record.add_argument("--set", dest="overrides", action="append", default=[], metavar="DEFENSE.PARAM=VALUE",
                        help="override one hyper-parameter, e.g. --set d3.lam=5 (repeatable)")
    record.add_argument("--data_root", "--data-root", dest="data_root",
                        help="dataset folder, if not where the record says")
    record.add_argument("--out", help="output folder (default <record>/analyze)")

    def defense_option(sub, kind):
        sub.add_argument("--defense", "--defenses", dest="defense", default=DEFAULT_DEFENSES[kind],
                         help=f"comma-separated native defenses to run (default {DEFAULT_DEFENSES[kind]})")

    kinds = parser.add_subparsers(dest="kind", required=True, metavar="KIND")

    def kind_parser(name, help, **kwargs):
        return kinds.add_parser(name, help=help, description=help, **kwargs)
    sub = kind_parser("interpolate", parents=[record], help="clean/backdoor loss, ACC and ASR along "
                           "θ_init + t (θ_defended − θ_init), t in [0, t_max] (paper Fig. 2)")
    defense_option(sub, "interpolate")
    sub.add_argument("--points", type=int, default=21, help="values of t (default 21)")
    sub.add_argument("--t_max", type=float, default=2.0, help="largest t (default 2: as far again past θ_defended)")

    sub = kind_parser("weights", parents=[record], help="histogram of θ_end − θ_init in the selected layers, "
                           "one panel per defense (paper Fig. 4b)")
    defense_option(sub, "weights")
    sub.add_argument("--layers", help="comma-separated modules (default: D3's θs for the architecture, else every "
                                      "nn.Linear)")
    sub.add_argument("--bins", type=int, default=60, help="histogram bins, shared by all defenses (default 60)")

    sub = kind_parser("tsne", parents=[record], help="t-SNE of penultimate features of clean and poisoned test "
                           "samples before and after a defense (paper Fig. 4a)")
    defense_option(sub, "tsne")
    sub.add_argument("--samples", type=int, default=500, help="clean and poisoned test samples each (default 500)")

    sub = kind_parser("cost", help="each defense's training time relative to FT from a compare or grid table "
                                        "(paper Fig. 3)")
    sub.add_argument("--from", dest="source", help="compare (or grid) output folder, or its compare.json/grid.json")
    sub.add_argument("--out", help="output folder (default <that folder>/analyze)")


def run(args: argparse.Namespace) -> int:
    return {"interpolate": run_interpolate, "weights": run_weights, "tsne": run_tsne, "cost": run_cost}[args.kind](args)


# --- shared ---------------------------------------------------------------------------------------------

def _defense_names(text: str, kind: str) -> List[str]:
    from .. import registry

    names = list(dict.fromkeys(n.strip() for n in (text or "").split(",") if n.strip()))
    if not names:
        raise ValueError(f"--defense is empty; name a defense, e.g. --defense {DEFAULT_DEFENSES[kind]}")
    for name in names:
        entry = registry.get(name)  # unknown names: one line
        if entry.where != "native":
            raise ValueError(f"{entry.name} has no in-process implementation here; analyze runs native defenses "
                             "only (see `d3-plugin list`)")
    return [registry.get(n).name for n in names]


def _prepare(args: argparse.Namespace, kind: str):
    """Check the options (before any data is read), then load the record: (bench, defense names, out)."""
    from ..record_io.records import load_attack_result
    from ..compare import MAX_SEED, bench_from_record, check_overrides, parse_overrides

    if not args.result_file:
        raise ValueError("--result_file is required: an attack record folder (record/<attack>) or its attack_result.pt")
    if args.epochs is not None and args.epochs < 0:
        raise ValueError(f"--epochs must be ≥ 0, got {args.epochs}")
    if not 0 <= args.seed <= MAX_SEED:
        raise ValueError(f"--seed {args.seed} is outside [0, {MAX_SEED}]")
    names = _defense_names(args.defense, kind)
    overrides = parse_overrides(args.overrides)
    check_overrides(overrides)
    record = load_attack_result(args.result_file, args.data_root)
    out = Path(args.out) if args.out else Path(record.folder) / "analyze"
    check_out(out)
    bench = bench_from_record(record, ratio=args.ratio, seed=args.seed, device=args.device)
    print(f"analyze {kind} on {record.folder} ({record.model_name}, {record.dataset}): {', '.join(names)}, "
          f"{len(bench.reserved)} reserved samples, seed {args.seed}, device {bench.device}; results in {out}")
    return bench, names, overrides, out


def _defend(bench, name: str, epochs: Optional[int], overrides: Mapping[str, Mapping[str, Any]]):
    """Run one defense as compare does (same seed, fp32): (purified model, seconds)."""
    from ..compare import build_for

    defense = build_for(name, bench, epochs=epochs, overrides=overrides.get(name))
    purified, _history, seconds = bench.run(defense)
    print(f"{name}: {seconds:.1f} s")
    return purified.eval(), seconds


def _state(model) -> Dict[str, Any]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def check_out(out: Path) -> None:
    """Fail early, in one line, when `out` could not be written, without creating it yet."""
    from ..files import OutputNotWritable, ensure_writable

    if out.exists():
        ensure_writable(out)
        return
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputNotWritable(f"cannot create output folder {out} ({parent} is not a writable folder); "
                                "choose another --out")


def write_all(out: Path, files: Mapping[str, bytes]) -> List[Path]:
    """Write every file of one analysis into `out`, all or none: each goes to a temporary file first and
    they replace their targets only once all are written (a folder this call created and could not fill
    is removed again)."""
    from ..files import atomic_path, ensure_writable

    created = not out.exists()
    ensure_writable(out)
    try:
        with contextlib.ExitStack() as stack:
            for name, data in files.items():
                stack.enter_context(atomic_path(out / name)).write_bytes(data)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only when empty
        raise
    return [out / name for name in files]


def csv_bytes(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in columns})
    return buffer.getvalue().encode("utf-8")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _png(fig) -> bytes:
    plt = _pyplot()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def _done(paths: Sequence[Path]) -> int:
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


# --- interpolate (Fig. 2) ---------------------------------------------------------------------------------

INTERPOLATE_COLUMNS = ("defense", "t", "clean_loss", "bd_loss", "acc", "asr")


def run_interpolate(args: argparse.Namespace) -> int:
    from ..analysis import interpolation_curve, interpolation_grid

    ts = interpolation_grid(args.points, args.t_max)
    bench, names, overrides, out = _prepare(args, "interpolate")
    init = _state(bench.model)
    loaders = bench.test_loaders()
    rows = []
    for name in names:
        purified, _ = _defend(bench, name, args.epochs, overrides)
        curve = interpolation_curve(bench.model, init, _state(purified), ts, lambda m: bench.evaluate(m, loaders))
        rows += [{"defense": name, **point} for point in curve]
        ends = {p["t"]: p for p in curve}
        print(f"{name}: ACC/ASR at t=0 {ends[ts[0]]['acc']:.4f}/{ends[ts[0]]['asr']:.4f}, at t={ts[-1]:g} "
              f"{ends[ts[-1]]['acc']:.4f}/{ends[ts[-1]]['asr']:.4f}")
    return _done(write_all(out, {"interpolate.csv": csv_bytes(INTERPOLATE_COLUMNS, rows),
                                 "interpolate.png": interpolate_plot(rows)}))


def interpolate_plot(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """Two panels, a colour per defense: clean (solid) and backdoor (dashed) loss; ACC (solid) and ASR (dashed)."""
    plt = _pyplot()
    fig, (losses, rates) = plt.subplots(1, 2, figsize=(11, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(dict.fromkeys(r["defense"] for r in rows)):
        curve = [r for r in rows if r["defense"] == name]
        ts, colour = [r["t"] for r in curve], colours[i % len(colours)]
        losses.plot(ts, [r["clean_loss"] for r in curve], "-", color=colour, label=f"{name}: clean loss")
        losses.plot(ts, [r["bd_loss"] for r in curve], "--", color=colour, label=f"{name}: backdoor loss")
        rates.plot(ts, [100 * r["acc"] for r in curve], "-", color=colour, label=f"{name}: ACC")
        rates.plot(ts, [100 * r["asr"] for r in curve], "--", color=colour, label=f"{name}: ASR")
    for ax, label in ((losses, "cross-entropy"), (rates, "%")):
        for t in (0, 1):
            ax.axvline(t, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xlabel("t  (θ_init + t·(θ_defended − θ_init))")
        ax.set_ylabel(label)
        ax.legend(fontsize="small")
    from matplotlib.ticker import FuncFormatter, NullFormatter
    losses.set_yscale("log")
    losses.yaxis.set_major_formatter(FuncFormatter(lambda value, _position: f"{value:g}"))
    losses.yaxis.set_minor_formatter(NullFormatter())  # minor labels of a log axis overlap
    rates.set_ylim(-2, 102)
    return _png(fig)


# --- weights (Fig. 4b) -------------------------------------------------------------------------------------

WEIGHTS_COLUMNS = ("defense", "bin_left", "bin_right", "count")
SUMMARY_COLUMNS = ("defense", "layers", "n", "mean_abs", "frobenius", "cosine")


def run_weights(args: argparse.Namespace) -> int:
    from ..analysis import selected_weight_names, shared_histogram, weight_differences, weight_summary
    from ..d3_targets import default_layers

    if args.bins < 1:
        raise ValueError(f"--bins must be ≥ 1, got {args.bins}")
    layers = None
    if args.layers is not None:
        layers = [n.strip() for n in args.layers.split(",") if n.strip()]
        if not layers:
            raise ValueError("--layers is empty; name modules, e.g. --layers fc,linear")
    bench, names, overrides, out = _prepare(args, "weights")
    if layers is None:
        layers = default_layers(bench.model_name or "")
    weight_names = selected_weight_names(bench.model, layers)
    init = _state(bench.model)
    deltas, summary = {}, []
    for name in names:
        end = _state(_defend(bench, name, args.epochs, overrides)[0])
        deltas[name] = weight_differences(init, end, weight_names)
        summary.append({"defense": name, "layers": " ".join(weight_names), **weight_summary(init, end, weight_names)})
        print(f"{name}: mean |Δ| {summary[-1]['mean_abs']:.3g}, ‖Δ‖_F {summary[-1]['frobenius']:.3g}, "
              f"cosine {summary[-1]['cosine']:.4f} over {len(weight_names)} weight tensors")
    edges, counts = shared_histogram(deltas, args.bins)
    rows = [{"defense": name, "bin_left": float(edges[i]), "bin_right": float(edges[i + 1]), "count": int(c)}
            for name, column in counts.items() for i, c in enumerate(column)]
    return _done(write_all(out, {"weights.csv": csv_bytes(WEIGHTS_COLUMNS, rows),
                                 "weights_summary.csv": csv_bytes(SUMMARY_COLUMNS, summary),
                                 "weights.png": weights_plot(edges, counts, summary)}))


def weights_plot(edges, counts: Mapping[str, Any], summary: Sequence[Mapping[str, Any]]) -> bytes:
    """One histogram panel per defense on shared bins and axes (log count)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(counts), figsize=(5 * len(counts), 3.8), sharex=True, sharey=True, squeeze=False)
    by_name = {s["defense"]: s for s in summary}
    for ax, (name, column) in zip(axes[0], counts.items()):
        ax.stairs(column, edges, fill=True)
        ax.set_yscale("log")
        ax.set_title(f"{name}: mean |Δ| {by_name[name]['mean_abs']:.2g}, ‖Δ‖_F {by_name[name]['frobenius']:.2g}",
                     fontsize="medium")
        ax.set_xlabel("θ_end − θ_init")
    axes[0][0].set_ylabel("weights")
    return _png(fig)


# --- tsne (Fig. 4a) ----------------------------------------------------------------------------------------

TSNE_COLUMNS = ("stage", "kind", "label", "x", "y")


def run_tsne(args: argparse.Namespace) -> int:
    from ..analysis import embed_tsne, penultimate_features, sample_indices
    import numpy as np

    if args.samples < 2:
        raise ValueError(f"--samples must be ≥ 2, got {args.samples}")
    try:
        import sklearn.manifold  # noqa: F401  (fail before the defense runs, not after)
    except ImportError:
        from ..cli import UserError
        raise UserError("t-SNE needs scikit-learn: pip install 'd3-plugin[analysis]'") from None
    bench, names, overrides, out = _prepare(args, "tsne")
    clean = bench.clean_test.subset(sample_indices(len(bench.clean_test), args.samples, args.seed))
    poisoned = bench.bd_test.subset(sample_indices(len(bench.bd_test), args.samples, args.seed))
    loaders = [bench.test_loader(part) for part in (clean, poisoned)]
    models = {"before": bench.model}
    for name in names:
        models[f"after {name}" if len(names) > 1 else "after"] = _defend(bench, name, args.epochs, overrides)[0]
    labels = [("clean", label) for label in clean.labels.tolist()] + \
             [("poisoned", label) for label in poisoned.original_labels.tolist()]
    rows = []
    for stage, model in models.items():
        features = np.concatenate([penultimate_features(model, loader) for loader in loaders])
        xy = embed_tsne(features, args.seed)
        rows += [{"stage": stage, "kind": kind, "label": label, "x": float(x), "y": float(y)}
                 for (kind, label), (x, y) in zip(labels, xy)]
    return _done(write_all(out, {"tsne.csv": csv_bytes(TSNE_COLUMNS, rows), "tsne.png": tsne_plot(rows)}))


def tsne_plot(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """One panel per stage: clean samples coloured by class, poisoned ones as black crosses."""
    plt = _pyplot()
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages) + 1, 5), squeeze=False, layout="constrained")
    for ax, stage in zip(axes[0], stages):
        clean = [r for r in rows if r["stage"] == stage and r["kind"] == "clean"]
        poisoned = [r for r in rows if r["stage"] == stage and r["kind"] == "poisoned"]
        points = ax.scatter([r["x"] for r in clean], [r["y"] for r in clean], c=[r["label"] for r in clean],
                            cmap="tab10" if max((r["label"] for r in clean), default=0) < 10 else "tab20", s=8)
        ax.scatter([r["x"] for r in poisoned], [r["y"] for r in poisoned], marker="x", c="black", s=14,
                   linewidths=0.8, label="poisoned")
        ax.set_title(stage)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(loc="best", fontsize="small")
    fig.colorbar(points, ax=axes[0].tolist(), label="class (clean samples)")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)  # constrained layout, not tight_layout: a shared colour bar
    plt.close(fig)
    return buffer.getvalue()


# --- cost (Fig. 3) -----------------------------------------------------------------------------------------

COST_COLUMNS = ("defense", "seconds_mean", "seconds_std", "n", "relative_to_ft")


def read_rows(source: Path) -> List[Mapping[str, Any]]:
    """The run rows of a compare or grid output folder (compare.json, else grid.json) or of such a file."""
    path = source
    if not source.exists():
        raise FileNotFoundError(f"--from {source}: no such file or folder; pass a compare output folder or its "
                                "compare.json")
    if source.is_dir():
        path = next((source / n for n in ("compare.json", "grid.json") if (source / n).is_file()), None)
        if path is None:
            raise FileNotFoundError(f"{source} holds no compare.json or grid.json; pass a compare output folder")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path} has no list of rows; pass a compare.json written by `d3-plugin compare`")
    return rows


def run_cost(args: argparse.Namespace) -> int:
    from ..analysis import relative_cost

    if not args.source:
        raise ValueError("--from is required: a compare output folder or its compare.json")
    source = Path(args.source)
    table = relative_cost(read_rows(source))
    out = Path(args.out) if args.out else (source if source.is_dir() else source.parent) / "analyze"
    check_out(out)
    for row in table:
        if row["n"]:
            print(f"{row['defense']}: {row['seconds_mean']:.1f} s over {row['n']} run(s), "
                  f"{row['relative_to_ft']:.2f}× FT")
        else:
            print(f"{row['defense']}: no finished run")
    return _done(write_all(out, {"cost.csv": csv_bytes(COST_COLUMNS, table), "cost.png": cost_plot(table)}))


def cost_plot(table: Sequence[Mapping[str, Any]]) -> bytes:
    """Bars of mean seconds / FT's mean (±std / FT's mean), a line at 1."""
    plt = _pyplot()
    rows = [r for r in table if r["n"]]
    ft = next(r["seconds_mean"] for r in rows if r["defense"] == "ft")
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(rows) + 2), 4))
    errors = [(r["seconds_std"] or 0) / ft for r in rows]
    ax.bar(range(len(rows)), [r["relative_to_ft"] for r in rows], yerr=errors if any(errors) else None, capsize=3)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["defense"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("training time relative to FT")
    return _png(fig)
