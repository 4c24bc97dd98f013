"""Attack × defense × seed grids, run on a local process pool or on Ray, one folder per finished cell.

    d3-plugin grid benchmarks/grids/table1.yaml --workers 2            # local pool
    d3-plugin grid table1.yaml --executor ray --address auto           # an existing Ray cluster

A grid file (YAML; docs/grid.md has every key):

    out: grids/table1                 # default: beside the file, named after it
    seeds: [0, 1, 2]
    epochs: 20                        # every defense's budget (default: each one's own)
    ratio: 0.1                        # reserved fraction, drawn per seed (default RESERVED_RATIO); a list sweeps it
    attacks:
      - record: /path/record/badnet   # an existing record
      - attack: blended               # trained by `d3-plugin attack` into <out>/record/<name>
        epochs: 15
        train_size: 20000
        params: {alpha: 0.2}
      - attack: sam-flatten           # flattens another attack of this grid
        from: blended
        rho: [1, 2, 3]                # a list sweeps: one record per value
    defenses:
      - ft
      - {name: d3, set: {eps: 0.1}}
    sweep:                            # DEFENSE.PARAM or ATTACK.PARAM → values (cartesian product)
      d3.lam: [1, 10]

Stages: records are trained first (flattened ones after their source), then every (record, defense,
settings, seed) cell runs. A cell is `<out>/cells/<record>/<label>/seed<S>-<hash>/result.json`, written
aside and renamed into place, so it exists whole or not at all: a re-run skips finished cells and retries
failed ones, and a killed grid resumes. The hash covers the record, the defense's full configuration, the
reserved draw and the seed. The table (`grid.md/.csv/.json`, `grid.png`) is rewritten from all cells.
"""
from __future__ import annotations

import itertools
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import yaml

from . import registry
from .errors import one_line
from .attacks.make import SPEC_FIELDS, AttackSpec, make_record, spec_from_values
from .attacks.registry import SAM_FLATTEN, resumes
from .files import StagedFolder, write_json
from .record_io.reserved import RESERVED_RATIO

GRID_KEYS = {"out", "grids", "seeds", "epochs", "ratio", "device", "data_root", "attacks", "defenses", "sweep",
             "reserved_source", "calibrate", "calibrate_set", "dataset", "model", "test_half"}
# an attack entry: an existing record, or an AttackSpec's options but those the grid sets (or does not offer)
GRID_SET_OPTIONS = {"out", "device", "resume", "result_file", "data_root", "hessian_iterations", "plain_sam"}
ATTACK_KEYS = {"record", "name", "from"} | set(SPEC_FIELDS) - GRID_SET_OPTIONS
UNRECORDED_KEYS = {"eval_every"}  # attack options that change what is measured while training, not the record
DEFENSE_KEYS = {"name", "label", "set", "sweep"}
NO_DEFENSE = "no defense"
RECORD_STAMP = "grid_record.json"  # in a trained record: the identity of the options that made it


class GridError(ValueError):
    """A grid file that cannot be run (one line: what and how to fix it)."""


# --- the plan -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AttackJob:
    """One record: existing (`record` set) or trained (`attack` with its options) into <out>/record/<name>."""

    name: str
    folder: str
    options: Mapping[str, Any] = field(default_factory=dict)
    source: Optional[str] = None  # sam-flatten: the folder of the grid record it flattens
    entry: str = ""               # the attack entry's name (shared by the records of its sweep)
    identity: str = ""            # hash of what makes a trained record: its options and its source's identity

    @property
    def trained(self) -> bool:
        return bool(self.options)


@dataclass(frozen=True)
class Cell:
    """One defense run: a record, a defense with its settings, a seed."""

    record: str
    folder: str           # the record folder
    label: str            # defense label in the table (name plus swept values)
    defense: str
    overrides: Mapping[str, Any]
    seed: int
    settings: Mapping[str, Any]  # epochs, ratio, device, data_root, reserved_source, calibrate, calibrate_set
    key: str = ""
    record_identity: str = ""  # AttackJob.identity of a trained record: a retrained record gets new cells

    def path(self, out: Path) -> Path:
        return out / "cells" / self.record / self.label.replace(" ", "-") / f"seed{self.seed}-{self.key}"


@dataclass
class Grid:
    out: Path
    seeds: List[int]
    attacks: List[AttackJob]
    cells: List[Cell]


def load_grids(path: str | os.PathLike, out: Optional[str] = None,
               only: Optional[Sequence[str]] = None) -> List[Grid]:
    """Read and check a grid file: one grid, or several under `grids: {NAME: {...}}` that inherit every
    top-level key, share `<out>/record/` (a record named alike in two grids is trained once and must be
    described alike) and write their tables to `<out>/<NAME>/`. `only` keeps the named grids (the whole
    file is still checked). Every problem is a one-line GridError."""
    raw, path = _read(path)
    root = Path(out or raw.get("out") or path.with_suffix(""))
    if "grids" not in raw:
        if only:
            raise GridError(f"{path} holds one grid without a name; drop --grid")
        return [plan(raw, root, base=path.parent)]
    subgrids = raw["grids"]
    if not isinstance(subgrids, Mapping) or not subgrids:
        raise GridError("grids must map a name to a grid, e.g. grids: {table1: {attacks: [...], defenses: [...]}}")
    shared = {k: v for k, v in raw.items() if k not in ("grids", "out")}
    names = [str(name) for name in subgrids]
    grids = [plan({**shared, **dict(sub or {})}, root / name, base=path.parent, records=root / "record")
             for name, sub in zip(names, subgrids.values())]
    _same_records(grids)
    unknown = [name for name in only or () if name not in names]
    if unknown:
        raise GridError(f"no grid named {unknown[0]} in {path}; it holds: {', '.join(names)}")
    return [g for name, g in zip(names, grids) if not only or name in only]


def _same_records(grids: Sequence["Grid"]) -> None:
    seen: Dict[str, AttackJob] = {}
    for job in (j for g in grids for j in g.attacks):
        other = seen.setdefault(job.folder, job)
        if (other.options, other.source) != (job.options, job.source):
            raise GridError(f"record {job.name} is described differently in two grids; name one of them apart")


def _read(path: str | os.PathLike) -> Tuple[Mapping[str, Any], Path]:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise GridError(f"cannot read grid file {path} ({error.strerror or error})") from None
    except yaml.YAMLError as error:
        raise GridError(f"grid file {path} is not valid YAML ({one_line(error)})") from None
    if not isinstance(raw, Mapping):
        raise GridError(f"grid file {path} must be a mapping with attacks, defenses and seeds")
    return raw, path


def load_grid(path: str | os.PathLike, out: Optional[str] = None) -> Grid:
    """A file holding one grid (no `grids:`)."""
    grids = load_grids(path, out)
    if len(grids) != 1:
        raise GridError(f"{path} holds {len(grids)} grids; use load_grids")
    return grids[0]


def plan(raw: Mapping[str, Any], out: Path, base: Path = Path("."), records: Optional[Path] = None) -> Grid:
    """The grid of one mapping; trained records go to `records` (default `<out>/record`)."""
    _known(raw, GRID_KEYS, "grid")
    seeds = _seeds(raw.get("seeds", [0]))
    sweep = _sweep(raw.get("sweep") or {})
    attacks = _attack_jobs(raw.get("attacks"), sweep, records or out / "record", base, raw)
    defenses = _defense_settings(raw.get("defenses"), sweep)
    settings = {k: raw.get(k) for k in ("epochs", "ratio", "device", "data_root", "reserved_source", "calibrate",
                                         "calibrate_set")}
    settings["device"] = settings["device"] or "auto"
    if raw.get("test_half") is not None:  # only when set: the cells of grids without it keep their keys
        settings["test_half"] = raw["test_half"]
    ratios = settings.pop("ratio")
    ratios = ratios if isinstance(ratios, list) and ratios else [RESERVED_RATIO if ratios is None else ratios]
    variants = []  # a list of ratios sweeps the reserved fraction too (the paper's Table 3)
    for ratio in ratios:
        variant = {**settings, "ratio": ratio}
        _check_settings(variant)
        variants.append((variant, f"ratio={ratio}" if len(ratios) > 1 else ""))
    cells = [_keyed(Cell(job.name, job.folder, _with(label, suffix), name, overrides, seed, variant,
                         record_identity=job.identity))
             for job in attacks for variant, suffix in variants for label, name, overrides in defenses
             for seed in seeds]
    return Grid(out, seeds, attacks, cells)


def _with(label: str, suffix: str) -> str:
    """'d3[lam=1]' + 'ratio=0.01' → 'd3[lam=1,ratio=0.01]'."""
    if not suffix:
        return label
    return f"{label[:-1]},{suffix}]" if label.endswith("]") else f"{label}[{suffix}]"


def _known(mapping: Mapping, keys: set, where: str) -> None:
    unknown = sorted(set(mapping) - keys)
    if unknown:
        raise GridError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(keys))}")


def _seeds(value) -> List[int]:
    seeds = value if isinstance(value, list) else [value]
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise GridError(f"seeds must be a list of integers ≥ 0, e.g. [0, 1, 2]; got {value!r}")
    if len(set(seeds)) < len(seeds):
        raise GridError(f"seeds repeat a value: {seeds}")
    return seeds


def _sweep(raw: Mapping) -> Dict[str, Dict[str, list]]:
    """{'d3.lam': [1, 10]} → {'d3': {'lam': [1, 10]}}."""
    if not isinstance(raw, Mapping):
        raise GridError("sweep must map NAME.PARAM to a list of values, e.g. d3.lam: [1, 10]")
    sweep: Dict[str, Dict[str, list]] = {}
    for key, values in raw.items():
        name, dot, param = str(key).rpartition(".")
        if not dot or not name or not isinstance(values, list) or not values:
            raise GridError(f"sweep {key!r}: use NAME.PARAM: [v1, v2, ...], e.g. d3.lam: [1, 10]")
        sweep.setdefault(name.lower(), {})[param] = values
    return sweep


def _product(fixed: Mapping[str, Any], swept: Mapping[str, list]) -> List[Tuple[Dict[str, Any], str]]:
    """Every combination of the swept values over `fixed`, with a label suffix such as 'lam=1,eps=0.1'."""
    lists = {k: v if isinstance(v, list) else [v] for k, v in {**fixed, **swept}.items()}
    varying = [k for k in lists if len(lists[k]) > 1]
    combos = []
    for values in itertools.product(*lists.values()):
        chosen = dict(zip(lists, values))
        combos.append((chosen, ",".join(f"{k}={chosen[k]}" for k in varying)))
    return combos


def _attack_jobs(entries, sweep, records: Path, base: Path, raw: Mapping) -> List[AttackJob]:
    if not isinstance(entries, list) or not entries:
        raise GridError("attacks must be a non-empty list of {record: PATH} or {attack: NAME, ...}")
    jobs: List[AttackJob] = []
    for entry in entries:
        entry = {"record": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, Mapping):
            raise GridError(f"attack entry {entry!r} must be a mapping")
        _known(entry, ATTACK_KEYS, f"attack {entry.get('attack') or entry.get('record')}")
        jobs += _one_attack(dict(entry), sweep, records, base, raw, jobs)
    names = [j.name for j in jobs]
    if len(set(names)) < len(names):
        raise GridError(f"two attacks share a record name ({', '.join(sorted({n for n in names if names.count(n) > 1}))}); "
                        f"give them distinct `name:`")
    return jobs


def _one_attack(entry: dict, sweep, records: Path, base: Path, raw: Mapping,
                earlier: List[AttackJob]) -> List[AttackJob]:
    if "record" in entry:
        if set(entry) - {"record", "name"}:
            raise GridError(f"record entry {entry['record']}: only `record` and `name` apply to an existing record")
        folder = (base / str(entry["record"])).resolve()
        if not (folder / "attack_result.pt").is_file() and not str(entry["record"]).endswith(".pt"):
            raise GridError(f"record {folder} has no attack_result.pt; make it or fix the path")
        name = entry.get("name") or folder.name
        return [AttackJob(name, str(folder), entry=name)]
    attack = str(entry.pop("attack", "")).lower()
    if not attack:
        raise GridError("an attack entry needs `attack: NAME` (or `record: PATH`)")
    registry.get(attack, "attack")  # unknown attack: one line, now
    name = entry.pop("name", None) or attack
    source = entry.pop("from", None)
    if (attack == SAM_FLATTEN) != (source is not None):
        raise GridError(f"attack {name}: `from: RECORD` goes with sam-flatten (and only with it)")
    sources = [j for j in earlier if source in (j.entry, j.name)] if source is not None else [None]
    if not sources:
        raise GridError(f"sam-flatten {name}: `from: {source}` names no earlier attack of this grid")
    for key in ("dataset", "model", "data_root"):  # grid-wide settings every trained record shares
        if raw.get(key) and key not in entry:
            entry[key] = raw[key]
    params = entry.pop("params", None) or {}
    swept = sweep.get(attack, {})
    options = {**entry, **{f"params.{k}": v for k, v in params.items()}}
    jobs = []
    for origin in sources:  # sam-flatten: every record of the entry it flattens
        for chosen, suffix in _product(options, {k if k in ATTACK_KEYS else f"params.{k}": v
                                                 for k, v in swept.items()}):
            parts = [name] + ([origin.name] if len(sources) > 1 else [])
            parts += [suffix.replace("params.", "").replace("=", "").replace(",", "-")] if suffix else []
            job_name = "-".join(parts)
            job_options = {"attack": attack, **chosen}
            recorded = {k: v for k, v in job_options.items() if k not in UNRECORDED_KEYS}
            identity = registry.config_hash({"options": recorded, "from": origin.identity if origin else None})
            jobs.append(AttackJob(job_name, str(records / job_name), job_options,
                                  origin.folder if origin else None, name, identity))
    return jobs


def _defense_settings(entries, sweep) -> List[Tuple[str, str, Dict[str, Any]]]:
    """(label, registry name, overrides) for every defense entry and swept combination; each is built once
    here, so an unknown name or value fails before anything runs."""
    if not isinstance(entries, list) or not entries:
        raise GridError("defenses must be a non-empty list of names or {name: NAME, set: {...}}")
    found = []
    for entry in entries:
        entry = {"name": entry} if isinstance(entry, str) else dict(entry)
        _known(entry, DEFENSE_KEYS, f"defense {entry.get('name')}")
        name = str(entry["name"]).lower()
        own = entry.get("sweep") or {}
        if not isinstance(own, Mapping) or not all(isinstance(v, list) and v for v in own.values()):
            raise GridError(f"defense {name}: sweep must map PARAM to a list of values, e.g. {{lam: [1, 10]}}")
        fixed = {param: [value] for param, value in dict(entry.get("set") or {}).items()}  # a list value stays one
        for overrides, suffix in _product(fixed, {**sweep.get(name, {}), **own}):
            try:
                registry.build(name, **overrides)
            except (TypeError, ValueError) as error:
                raise GridError(f"defense {name}: {one_line(error)}") from None
            label = entry.get("label") or name
            found.append((f"{label}[{suffix}]" if suffix else label, name, overrides))
    labels = [f[0] for f in found]
    if len(set(labels)) < len(labels):
        raise GridError("two defense entries share a label; give them distinct `label:`")
    return found


def _check_settings(settings: Mapping[str, Any]) -> None:
    ratio, epochs = settings["ratio"], settings["epochs"]
    if not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise GridError(f"ratio must be a fraction in (0, 1], got {ratio!r}")
    if epochs is not None and (not isinstance(epochs, int) or epochs < 0):
        raise GridError(f"epochs must be an integer ≥ 0, got {epochs!r}")
    if settings["reserved_source"]:
        from .auxiliary import parse_source
        parse_source(str(settings["reserved_source"]))
    if settings["calibrate"]:
        registry.build_calibration(settings["calibrate"], **dict(settings["calibrate_set"] or {}))
    from .bench import TEST_HALVES
    if settings.get("test_half") not in (None, *TEST_HALVES):
        raise GridError(f"test_half must be dev (even test indices) or test (odd ones), got {settings['test_half']!r}")


def _keyed(cell: Cell) -> Cell:
    payload = {"record": cell.folder, "defense": cell.defense, "overrides": dict(cell.overrides),
               "seed": cell.seed, **{k: v for k, v in cell.settings.items() if k != "device"}}
    if cell.record_identity:
        payload["record_identity"] = cell.record_identity
    return Cell(**{**cell.__dict__, "key": registry.config_hash(payload)})


# --- running one job (in a worker process or a Ray task) -----------------------------------------------

def set_threads(threads: Optional[int]) -> None:
    if threads:
        import torch
        torch.set_num_threads(max(1, int(threads)))


def attack_argv(job: AttackJob) -> List[str]:
    """The `d3-plugin attack` command line that makes the record of `job` (written beside it)."""
    options = dict(job.options)
    attack = options.pop("attack")
    argv = ["attack", attack, "--out", job.folder] + (["--resume"] if resumes(attack) else [])
    if job.source:
        argv += ["--result_file", job.source]
    for key, value in options.items():
        if key.startswith("params."):
            argv += ["--param", f"{key[7:]}={json.dumps(value)}"]
        else:
            argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def attack_spec(job: AttackJob, device: str = "auto") -> AttackSpec:
    """The AttackSpec of a trained record; it continues a killed run where it can."""
    options = dict(job.options)
    params = {key[len("params."):]: options.pop(key) for key in list(options) if key.startswith("params.")}
    return spec_from_values({**options, "out": job.folder, "result_file": job.source, "device": device,
                             "resume": resumes(options["attack"]), "params": params})


def run_attack_job(job: AttackJob, device: str = "auto", threads: Optional[int] = None) -> Dict[str, Any]:
    """Train (or flatten) one record unless it is complete and was made with the job's options (its
    RECORD_STAMP); a record made with other options is moved aside first. {name, seconds, error, note}."""
    folder, note = Path(job.folder), ""
    if not job.trained or record_is_current(job):
        return {"name": job.name, "seconds": 0.0, "error": "", "note": note, "skipped": True}
    if folder.exists():
        aside = folder.with_name(f"{folder.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        folder.rename(aside)
        note = f"made with other options than the grid's; moved to {aside} and made again"
    set_threads(threads)
    started, error = time.perf_counter(), ""
    try:
        make_record(attack_spec(job, device))
    except Exception as failure:  # noqa: BLE001 - reported in the grid, never fatal to it
        error = f"{type(failure).__name__}: {one_line(failure)}"
    if not error:
        argv = attack_argv(job) + ["--device", device]
        write_json(folder / RECORD_STAMP, {"identity": job.identity, "command": ["d3-plugin", *argv]})
    return {"name": job.name, "seconds": time.perf_counter() - started, "error": error, "note": note,
            "skipped": False}


def record_is_current(job: AttackJob) -> bool:
    """A complete record whose stamp names the job's identity (a record without a stamp is not current)."""
    folder = Path(job.folder)
    if not (folder / "attack_info.json").is_file():
        return False
    try:
        return json.loads((folder / RECORD_STAMP).read_text()).get("identity") == job.identity
    except (OSError, ValueError, AttributeError):
        return False


def run_cell(cell: Cell, out: str, threads: Optional[int] = None) -> Dict[str, Any]:
    """Run one cell unless it finished before; returns its result (metrics or error)."""
    final = cell.path(Path(out))
    done = read_cell(final)
    if done is not None:
        return {**done, "skipped": True}
    set_threads(threads)
    result = _cell_identity(cell)
    try:
        result.update(_measure(cell))
    except Exception as failure:  # noqa: BLE001 - one failing cell never stops the grid
        return {**result, "error": f"{type(failure).__name__}: {one_line(failure)}"}
    _publish(final, result)
    return result


CELL_KEYS = {"record", "defense", "seed", "config_hash", "error"}  # what every result.json holds


def read_cell(final: Path) -> Optional[Dict[str, Any]]:
    """A finished cell's result, or None. A corrupt one (truncated, edited) is named on stderr and its folder
    moved aside to `<folder>.corrupt-<stamp>`: the cell counts as not run (a grid runs it again)."""
    done = final / "result.json"
    if not done.is_file():
        return None
    try:
        result = json.loads(done.read_text(encoding="utf-8"))
        problem = "" if isinstance(result, dict) and CELL_KEYS <= set(result) else "not a cell result"
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
        problem = one_line(error)
    if not problem:
        return result
    aside = final.with_name(f"{final.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    final.rename(aside)
    print(f"warning: {done} is corrupt ({problem}); moved its cell aside to {aside.name}, it counts as not run",
          file=sys.stderr)
    return None


def _cell_identity(cell: Cell) -> Dict[str, Any]:
    return {"record": cell.record, "defense": cell.label, "name": cell.defense, "overrides": dict(cell.overrides),
            "seed": cell.seed, "config_hash": cell.key, "settings": dict(cell.settings), "error": ""}


def _measure(cell: Cell) -> Dict[str, Any]:
    from .record_io.records import load_attack_result
    from .bench import bench_from_record, on_test_half, with_auxiliary
    from .compare import build_for, run_native

    settings = cell.settings
    record = load_attack_result(cell.folder, settings.get("data_root"))
    bench = bench_from_record(record, ratio=settings["ratio"], seed=cell.seed, device=settings["device"])
    bench = on_test_half(bench, settings.get("test_half"))
    if cell.defense == NO_DEFENSE:
        return {**bench.evaluate(bench.model), "seconds": 0.0}
    calibration = None
    if settings.get("calibrate"):
        calibration = registry.build_calibration(settings["calibrate"], seed=cell.seed,
                                                 **dict(settings.get("calibrate_set") or {}))
    bench = with_auxiliary(bench, settings.get("reserved_source"), calibration)
    defense = build_for(cell.defense, bench, epochs=settings.get("epochs"), overrides=cell.overrides)
    metrics = run_native(bench, defense)
    return {**metrics, "config": defense.config_dict(), "reserved": bench.reserved_digest()}


def _publish(final: Path, result: Mapping[str, Any]) -> None:
    """Write the cell aside and swap it into place (files.StagedFolder): the folder is whole or absent."""
    staged = StagedFolder(final)
    staged.staging.mkdir(parents=True)
    write_json(staged.staging / "result.json", result)
    staged.publish()


def no_defense_cells(grid: Grid) -> List[Cell]:
    """One seed-independent cell per record: the backdoored model's own ACC / ASR / RA (DER's reference)."""
    settings = grid.cells[0].settings if grid.cells else {"ratio": RESERVED_RATIO, "device": "auto"}
    plain = {**settings, "reserved_source": None, "calibrate": None, "calibrate_set": None}
    return [_keyed(Cell(job.name, job.folder, NO_DEFENSE, NO_DEFENSE, {}, 0, plain, record_identity=job.identity))
            for job in grid.attacks]


# --- executors: where the jobs run --------------------------------------------------------------------

class LocalPool:
    """`workers` processes on this machine (spawned, so CUDA works in them), torch threads split evenly;
    with one worker the jobs run in this process. `gpus` (devices.worker_gpus): dealt round robin, one
    to each worker."""

    def __init__(self, workers: int = 1, gpus: Sequence[str] = ()):
        if not isinstance(workers, int) or workers < 1:
            raise GridError(f"--workers must be an integer ≥ 1, got {workers!r}")
        self.workers, self.gpus = workers, list(gpus)
        self.threads = max(1, (os.cpu_count() or 1) // workers)

    def map(self, function: Callable, calls: Sequence[tuple]) -> Iterator[Dict[str, Any]]:
        if self.workers == 1 or len(calls) < 2:
            for args in calls:
                yield function(*args, threads=self.threads)
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(self.workers, mp_context=context, initializer=start_worker,
                                 initargs=(os.getpid(), self.gpus, context.Value("i", 0))) as pool:
            futures = [pool.submit(function, *args, threads=self.threads) for args in calls]
            for future in as_completed(futures):
                yield future.result()


def start_worker(parent: int, gpus: Sequence[str], counter) -> None:
    """A worker's initializer: its own GPU (devices.take_gpu), and an end when its driver is gone."""
    from .devices import take_gpu

    take_gpu(list(gpus), counter)
    exit_with_parent(parent)


def exit_with_parent(parent: int) -> None:
    """A worker's initializer: end this process once its driver is gone (a killed `grid` leaves no worker
    running on; the cell it was computing is simply not published)."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


class RayPool:
    """One Ray task per job on a cluster (`address="auto"`) or a local Ray instance (`address=None`),
    each declaring `cpus` CPUs and `gpus` GPUs (None: one when `devices`, the grids' devices, are not all
    cpu and the cluster has GPUs; devices.ray_gpus_per_task); results are gathered on the driver."""

    def __init__(self, address: Optional[str] = None, cpus: float = 1, gpus: Optional[float] = None,
                 devices: Iterable[str] = ("auto",)):
        try:
            import ray
        except ImportError:
            raise GridError("--executor ray needs Ray: pip install 'd3-plugin[ray]'") from None
        from .devices import ray_gpus_per_task

        self.ray, self.cpus = ray, cpus
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     **({} if address else {"num_cpus": os.cpu_count()}))
        self.gpus = ray_gpus_per_task(gpus, devices, ray.cluster_resources().get("GPU", 0))

    def map(self, function: Callable, calls: Sequence[tuple]) -> Iterator[Dict[str, Any]]:
        remote = self.ray.remote(num_cpus=self.cpus, num_gpus=self.gpus)(function)
        pending = [remote.remote(*args, threads=max(1, int(self.cpus))) for args in calls]
        while pending:
            done, pending = self.ray.wait(pending, num_returns=1)
            yield self.ray.get(done[0])


# --- the driver -----------------------------------------------------------------------------------------

def grid_device(grid: Grid) -> str:
    """The device a grid's records and cells compute on (its `device` key)."""
    return grid.cells[0].settings["device"] if grid.cells else "auto"


def run_grid(grid: Grid, pool, *, echo: Callable[[str], None] = print, progress: bool = True) -> List[Dict]:
    """Records first (flattened ones after their sources), then every cell; returns the run rows and
    writes the grid's tables. Failures are rows with an error, never an exception."""
    from tqdm.auto import tqdm

    device = grid_device(grid)
    failed: Dict[str, str] = {}
    for stage in ([j for j in grid.attacks if not j.source], [j for j in grid.attacks if j.source]):
        for job in stage:
            source = next((j for j in grid.attacks if j.folder == job.source), None)
            if source is not None and source.name in failed:
                failed[job.name] = f"its source record {source.name} was not made"
        calls = [(job, device) for job in stage if job.trained and job.name not in failed]
        for result in tqdm(pool.map(run_attack_job, calls), total=len(calls), desc="records",
                           disable=not progress or not calls):
            if result["note"]:
                echo(f"record {result['name']}: {result['note']}")
            if result["error"]:
                failed[result["name"]] = result["error"]
                echo(f"record {result['name']}: FAILED {result['error']}")
    cells = [c for c in no_defense_cells(grid) + grid.cells if c.record not in failed]
    rows = [_record_failure(c, failed[c.record]) for c in grid.cells if c.record in failed]
    calls = [(cell, str(grid.out)) for cell in cells]
    for result in tqdm(pool.map(run_cell, calls), total=len(calls), desc="cells", disable=not progress):
        rows.append(result)
        if result["error"]:
            echo(f"{result['record']} · {result['defense']} (seed {result['seed']}): FAILED {result['error']}")
    order = {cell.key: i for i, cell in enumerate(no_defense_cells(grid) + grid.cells)}
    rows = table_rows(sorted(rows, key=lambda r: order[r["config_hash"]]))  # plan order, whatever finished first
    write_grid_outputs(rows, grid.out)
    return rows


def finished_rows(grid: Grid) -> Tuple[List[Dict[str, Any]], int]:
    """The run rows of the cells already finished (plan order), and how many cells are not: a table of a grid
    that is still running, or was stopped, without running anything."""
    cells = no_defense_cells(grid) + grid.cells
    results = [r for r in (read_cell(cell.path(grid.out)) for cell in cells) if r is not None]
    return table_rows(results), len(cells) - len(results)


def _record_failure(cell: Cell, error: str) -> Dict[str, Any]:
    return {**_cell_identity(cell), "error": f"record not made: {error}"}


# --- the table ------------------------------------------------------------------------------------------

def table_rows(results: Iterable[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """Run rows (record, defense label, seed, acc, asr, ra, der, seconds, config_hash, error) in plan order;
    DER against the record's no-defense row."""
    from .evaluation import defense_effectiveness_rate

    results = list(results)
    before = {r["record"]: r for r in results if r["defense"] == NO_DEFENSE and not r["error"]}
    rows = []
    for r in results:
        row = {k: r.get(k) for k in ("record", "defense", "seed", "acc", "asr", "ra", "seconds", "config_hash")}
        row["error"] = r.get("error") or ""
        base = before.get(r["record"])
        row["der"] = None
        if not row["error"] and r["defense"] != NO_DEFENSE and base:
            row["der"] = defense_effectiveness_rate(base["acc"], base["asr"], r["acc"], r["asr"])
        if r["defense"] == NO_DEFENSE:
            row["seed"] = None
        rows.append(row)
    return rows


def aggregate(rows: Sequence[Mapping]) -> List[Dict[str, Any]]:
    """One row per (record, defense label): mean, sample std, min, max over the seeds (compare's rule)."""
    from .compare import aggregate as per_defense

    records = list(dict.fromkeys(r["record"] for r in rows))
    return [{"record": record, **row} for record in records
            for row in per_defense([r for r in rows if r["record"] == record])]


def markdown(rows: Sequence[Mapping]) -> str:
    from .compare import _cell

    seeds = sorted({r["seed"] for r in rows if isinstance(r.get("seed"), int)})
    header = ["record", "defense", "ACC %", "ASR %", "RA %", "DER %", "seconds", "n", "error"]
    lines = [f"Seeds {', '.join(map(str, seeds))}. Each cell: mean ± sample std (min–max) over the n seeds that "
             "finished.\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in aggregate(rows):
        n = f"{row['n']}" if row["n"] == row["runs"] else f"{row['n']} of {row['runs']}"
        cells = [row["record"], row["defense"], *(_cell(row, k, 100, 2) for k in ("acc", "asr", "ra", "der")),
                 _cell(row, "seconds", 1, 1), n, row.get("error") or ""]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def csv_text(rows: Sequence[Mapping]) -> str:
    import csv
    import io

    columns = ["record", "defense", "seed", "n", "runs"] + [f"{m}{s}" for m in ("acc", "asr", "ra", "der", "seconds")
                                                           for s in ("", "_std", "_min", "_max")] + ["config_hash", "error"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in list(rows) + aggregate(rows):
        writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in columns})
    return buffer.getvalue()


def plots(rows: Sequence[Mapping]) -> bytes:
    """PNG: DER per record and defense with ±std error bars, and ACC against ASR per run, by defense."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = [r for r in aggregate(rows) if r["defense"] != NO_DEFENSE]
    fig, (bars, scatter) = plt.subplots(1, 2, figsize=(max(10, 0.5 * len(table) + 6), 4.5))
    positions = range(len(table))
    bars.bar(list(positions), [100 * (r["der"] or 0) for r in table],
             yerr=[100 * (r.get("der_std") or 0) for r in table], capsize=3)
    bars.set_xticks(list(positions))
    bars.set_xticklabels([f"{r['record']} · {r['defense']}" for r in table], rotation=60, ha="right", fontsize="small")
    bars.set_ylabel("DER %")
    bars.set_ylim(0, 100)
    for label in dict.fromkeys(r["defense"] for r in rows if r["defense"] != NO_DEFENSE):
        runs = [r for r in rows if r["defense"] == label and not r["error"]]
        scatter.scatter([100 * r["asr"] for r in runs], [100 * r["acc"] for r in runs], label=label, s=18)
    scatter.set_xlabel("ASR %")
    scatter.set_ylabel("ACC %")
    scatter.legend(fontsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def write_grid_outputs(rows: Sequence[Mapping], out: Path) -> None:
    from .files import write_bytes, write_text

    write_text(out / "grid.md", markdown(rows))
    write_text(out / "grid.csv", csv_text(rows))
    write_json(out / "grid.json", {"rows": list(rows), "aggregate": aggregate(rows)})
    write_bytes(out / "grid.png", plots(rows))
