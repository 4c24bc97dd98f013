"""`d3-plugin grid CONFIG.yaml`: an attack × defense × seed grid on a local process pool or on Ray."""
from __future__ import annotations

import argparse

NAME = "grid"
HELP = ("run an attack × defense × seed grid (records trained as needed) on a local process pool or on Ray; "
        "finished cells are kept, so a re-run or a killed grid resumes; one table over all cells")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="grid file (YAML): attacks, defenses, seeds, optional sweep (docs/grid.md)")
    parser.add_argument("--out", help="output folder (default: the file's `out`, else beside it, named after it)")
    parser.add_argument("--executor", choices=["local", "ray"], default="local",
                        help="local: a process pool on this machine (default); ray: one Ray task per job")
    parser.add_argument("--workers", type=int, default=1, help="local: worker processes (torch threads are split "
                                                                "evenly between them; default 1)")
    parser.add_argument("--address", default=None, help="ray: cluster address, e.g. auto (default: start a local Ray)")
    parser.add_argument("--cpus-per-task", type=float, default=1, help="ray: CPUs each task declares (default 1)")
    parser.add_argument("--gpus-per-task", type=float, default=None,
                        help="ray: GPUs each task declares (default: 1 when the grid's device is not cpu and the "
                             "cluster has GPUs, else 0; Ray hides the GPUs from a task that declares none)")
    parser.add_argument("--grid", action="append", dest="only", metavar="NAME",
                        help="of a file with several grids, run (or plan, or tabulate) only this one; repeatable")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (records and cells) and stop")
    parser.add_argument("--table-only", action="store_true",
                        help="write the tables from the cells already finished and stop (runs nothing)")


def run(args: argparse.Namespace) -> int:
    import contextlib

    from ..files import folder_lock
    from ..devices import worker_gpus
    from ..grid import LocalPool, RayPool, grid_device, load_grids, record_is_current, run_grid

    grids = load_grids(args.config, args.out, args.only)
    for grid in grids:
        to_make = [job for job in grid.attacks if job.trained and not record_is_current(job)]
        print(f"grid {grid.out.name}: {len(grid.attacks)} records ({len(to_make)} to make), {len(grid.cells)} cells "
              f"({len({c.label for c in grid.cells})} defense settings × {len(grid.seeds)} seeds); out {grid.out}")
        if args.dry_run:
            for job in grid.attacks:
                state = "made" if record_is_current(job) else "to make"
                print(f"  record {job.name}: {f'{state} {dict(job.options)}' if job.trained else job.folder}")
            for label in dict.fromkeys(c.label for c in grid.cells):
                print(f"  defense {label}")
    if args.dry_run:
        return 0
    if args.table_only:
        return write_finished_tables(grids)
    devices = [grid_device(grid) for grid in grids]
    pool = (RayPool(args.address, args.cpus_per_task, args.gpus_per_task, devices) if args.executor == "ray"
            else LocalPool(args.workers, worker_gpus(devices, args.workers)))
    failed = False
    with contextlib.ExitStack() as locks:  # a second grid into the same folders is refused (--table-only is not)
        for grid in grids:
            locks.enter_context(folder_lock(grid.out))
        for grid in grids:
            rows = run_grid(grid, pool)
            print((grid.out / "grid.md").read_text())
            failed = failed or any(row["error"] for row in rows)
    return 1 if failed else 0


def write_finished_tables(grids) -> int:
    from ..grid import finished_rows, write_grid_outputs

    for grid in grids:
        rows, pending = finished_rows(grid)
        if not rows:
            print(f"grid {grid.out.name}: no cell finished yet, no table written")
            continue
        write_grid_outputs(rows, grid.out)
        print(f"grid {grid.out.name}: {len(rows)} cells finished, {pending} not (yet); tables in {grid.out}")
        print((grid.out / "grid.md").read_text())
    return 0
