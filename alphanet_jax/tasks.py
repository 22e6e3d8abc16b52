"""The command-line tasks behind launch.py: train, evaluate, search, export.

Each task reads the config and a workdir, and writes its results there:
  train     -> checkpoints/, tensorboard/, metrics.jsonl
  evaluate  -> eval.json (and a printed table): BN calibration + top-1/top-5 of named subnets
  search    -> search/ (evaluated.jsonl, pareto.json/.csv/.png)
  export    -> export/ (a standalone subnet: config.json + variables.npz; model.onnx with export.format=onnx)
  latency   -> latency/ (table.json: per-part latency on this device, validation.json/.png)
Supernet weights come from the workdir's newest checkpoint, or from `eval.checkpoint`: another
workdir, or an official PyTorch `.pth(.tar)` file (through the converter).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

import jax
import ml_collections

from alphanet_jax import compile_cache
from alphanet_jax import config_check
from alphanet_jax.console import log
from alphanet_jax import data as data_lib
from alphanet_jax import errors
from alphanet_jax import evaluate as eval_lib
from alphanet_jax import export as export_lib
from alphanet_jax import fingerprint as fingerprint_lib
from alphanet_jax import latency as latency_lib
from alphanet_jax import latency_fit
from alphanet_jax import latency_measure
from alphanet_jax import mesh as mesh_lib
from alphanet_jax import onnx_export
from alphanet_jax import search as search_lib
from alphanet_jax import search_results
from alphanet_jax import train as train_lib
from alphanet_jax.evolution import check_latency_budget
from alphanet_jax.files import atomic_write
from alphanet_jax.flops import count_flops, count_params
from alphanet_jax.presets import PRESET_TITLES, as_subnet
from alphanet_jax.search_config import SearchConfig
from alphanet_jax.search_space import SubnetConfig, get_space

def parse_tasks(run: str) -> list[str]:
    tasks = [t.strip() for t in run.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise errors.ConfigError(f"unknown task(s) {bad} in run={run!r}; choose from {list(TASKS)} "
                                 f"(comma-separated, e.g. --mode=evaluate)")
    return tasks


def load_supernet(config: ml_collections.ConfigDict, workdir: str, mesh=None) -> tuple[dict, str]:
    """Supernet variables and a description of where they came from."""
    variables, weights = load_weights(config, workdir, mesh)
    return variables, weights["description"]


def load_weights(config: ml_collections.ConfigDict, workdir: str, mesh=None) -> tuple[dict, dict]:
    """Supernet variables and where they came from: {source (absolute path), step (the checkpoint's;
    None for a PyTorch file), description}."""
    space = get_space(config.space)
    source = config.eval.checkpoint or workdir
    where = {"source": os.path.abspath(source), "step": None, "description": f"PyTorch checkpoint {source}"}
    if os.path.isfile(source):
        from alphanet_jax import convert
        return convert.load_pytorch_checkpoint(source, space), where
    if not os.path.isdir(source):
        raise errors.PathNotFoundError(f"eval.checkpoint {source!r} is neither a workdir nor a .pth file")
    variables, step = train_lib.restore_variables(config, source, mesh)
    return variables, dict(where, step=int(step), description=f"{source}/checkpoints/{step}")


def search_context(config: ml_collections.ConfigDict, weights: dict, variables: Any) -> dict:
    """What the search's numbers depend on besides the subnet (`search.run_search(context=)`): the
    weights (path, step, content fingerprint) and the settings of BN calibration and evaluation."""
    e = config.eval
    data = dataclasses.asdict(data_lib.resolve_config(config.data))
    for k in ("num_workers", "prefetch_examples"):  # speed only
        data.pop(k, None)
    return {"weights": {"source": weights["source"], "step": weights["step"],
                        "fingerprint": fingerprint_lib.fingerprint(variables)},
            "data": data,
            "calibration": {"batches": int(config.search.calib_batches), "batch_size": int(e.calib_batch_size),
                            "seed": int(e.calib_seed)},
            "evaluation": {"batch_size": int(e.batch_size)},
            "model": {"dtype": jax.numpy.dtype(train_lib.compute_dtype(config.model.dtype)).name,
                      "bn_eps": float(config.model.bn_eps)}}


def _check_eval_batches(config, mesh) -> None:
    for key in ("calib_batch_size", "batch_size"):
        mesh_lib.check_batch_size(config.eval[key], mesh, f"eval.{key}")


def _subnet_list(config: ml_collections.ConfigDict) -> list[tuple[str, SubnetConfig]]:
    space = get_space(config.space)
    out = []
    for name in filter(None, (n.strip() for n in config.eval.subnets.split(","))):
        out.append((PRESET_TITLES.get(name, name), as_subnet(name, space)))
    if not out:
        raise errors.ConfigError("eval.subnets is empty: give preset names (a0..a6, a5_1, min, max) or JSON files")
    return out


def format_table(rows: list[dict]) -> str:
    head = f"{'subnet':<22} {'res':>4} {'MFLOPs':>9} {'params':>11} {'top-1':>7} {'top-5':>7} {'images':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['name']:<22} {r['resolution']:>4} {r['mflops']:>9.2f} {r['params']:>11,} "
                     f"{r['top1']:>6.2f}% {r['top5']:>6.2f}% {r['count']:>7}")
    return "\n".join(lines)


def train_task(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (or resumes training) the supernet in `workdir`; returns the summary without the state."""
    out = train_lib.train_and_evaluate(config, workdir)
    return {k: v for k, v in out.items() if k != "state"}


def evaluate_task(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    """Calibrate and evaluate `eval.subnets`; prints a table and writes eval.json."""
    space = get_space(config.space)
    subnets = _subnet_list(config)  # bad names fail before any compilation
    mesh = mesh_lib.make_mesh(config.mesh.data)
    _check_eval_batches(config, mesh)
    variables, source = load_supernet(config, workdir, mesh)
    model = train_lib.make_model(config, space, for_training=False)
    rows = train_lib.calibrate_and_evaluate(config, model, variables, mesh, subnets)
    log(f"weights: {source}\n" + format_table(rows))
    if jax.process_index() == 0:
        atomic_write(os.path.join(workdir, "eval.json"), json.dumps({"weights": source, "results": rows}, indent=1))
    return rows


def search_task(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    """Evolutionary search over the trained supernet; results in workdir/search."""
    space = get_space(config.space)
    s = config.search
    cfg = {k: v for k, v in s.to_dict().items() if k != "calib_batches"}
    latency_fn = None
    if s.get("objective", "flops") == "latency":  # the table and the budget are checked before any evaluation
        table, table_path = load_latency_table(config, workdir)
        latency_fn = latency_fit.make_predictor(table, space)
        check_latency_budget(space, SearchConfig.from_any(cfg), latency_fn)
        log(f"search objective: latency predicted by {table_path} ({table['device_kind']}, {table['runtime']}, "
             f"batch {table['batch_size']}), buckets of {s.latency_step} ms"
             + (f", budget {s.max_latency_ms} ms" if s.max_latency_ms else ""))
    # Each host evaluates its own candidates on its local devices over the whole val split.
    mesh = eval_lib.local_mesh()
    _check_eval_batches(config, mesh)
    variables, weights = load_weights(config, workdir, mesh_lib.make_mesh(config.mesh.data))
    variables = jax.device_get(variables)
    # Stored results are reused only for the same weights (by content) and calibration/eval settings.
    context = search_context(config, weights, variables)
    model = train_lib.make_model(config, space, for_training=False)
    calib, evals = train_lib.eval_iterators(config, local=True)
    evaluate_fn = eval_lib.make_evaluate_fn(model, variables, calib, evals, mesh=mesh,
                                            num_calib_batches=s.calib_batches)
    presets = {}
    if space.name == "alphanet":
        presets = search_lib.evaluate_presets(evaluate_fn, space)
        if latency_fn is not None:
            presets = {k: dict(r, latency_ms=latency_fn(SubnetConfig.from_dict(r["subnet"], space)))
                       for k, r in presets.items()}
    log(f"evolutionary search on {weights['description']} (weights {context['weights']['fingerprint'][:12]}): "
        f"{s.evo_iter} generations, window [{s.flops_min}, {s.flops_max}] MFLOPs")
    front = search_lib.run_search(evaluate_fn, space, cfg, os.path.join(workdir, "search"),
                                  preset_results=presets, context=context, latency_fn=latency_fn)
    rows = [dict(r, name=f"pareto {i}") for i, r in enumerate(front)]
    log(format_table(rows))
    if latency_fn is not None:
        remeasure_front(config, front, os.path.join(workdir, "search"), context)
    return front


def load_latency_table(config: ml_collections.ConfigDict, workdir: str) -> tuple[dict, str]:
    """The latency table of `latency.table` (e.g. built on the target device) or DIR/latency/table.json,
    checked against this space and latency.batch_size."""
    path = config.latency.table or os.path.join(workdir, "latency", latency_measure.TABLE_FILE)
    if not os.path.exists(path):
        raise errors.PathNotFoundError(f"latency table {path} is missing: build one on the target device with "
                                       f"--mode=latency, or name one with --config.latency.table=PATH")
    table = latency_lib.load_table(path, space_id=latency_measure.space_id(get_space(config.space)),
                                   batch_size=int(config.latency.batch_size), dtype=latency_measure.DTYPE)
    return table, path


def remeasure_front(config: ml_collections.ConfigDict, front: list[dict], directory: str, context: dict) -> None:
    """Measures the front's subnets end to end on this device; pareto.json/.csv get `measured_ms` beside
    the predicted `latency_ms`."""
    space = get_space(config.space)
    L = config.latency
    timer = latency_measure.make_timer(L.runtime, space, int(L.batch_size), warmup=int(L.warmup),
                                       repeats=int(L.repeats), bn_eps=float(config.model.bn_eps),
                                       statistic=L.get("statistic", "median"), rounds=int(L.get("rounds", 2)))
    t = time.perf_counter()
    measured = timer.subnets_ms([SubnetConfig.from_dict(r["subnet"], space) for r in front])
    for r, ms in zip(front, measured):
        r["measured_ms"], r["measured_on"] = ms, timer.describe()["device_kind"]
    if jax.process_index() == 0:
        search_results.write_outputs(directory, front, None, None, plot=False, context=context)
    log(f"front re-measured on this device ({time.perf_counter() - t:.0f} s): "
         + ", ".join(f"{r['latency_ms']:.3f}->{r['measured_ms']:.3f}" for r in front) + " ms (predicted->measured)")


def latency_task(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Times the space's parts on this device (DIR/latency/table.json; parts already in it are kept),
    fits how they add up on whole subnets, and validates the prediction on other subnets
    (validation.json, validation.png)."""
    space = get_space(config.space)
    L = config.latency
    directory = os.path.join(workdir, "latency")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, latency_measure.TABLE_FILE)
    t0 = time.perf_counter()
    timer = latency_measure.make_timer(L.runtime, space, int(L.batch_size), warmup=int(L.warmup),
                                       repeats=int(L.repeats), bn_eps=float(config.model.bn_eps),
                                       statistic=L.get("statistic", "median"), rounds=int(L.get("rounds", 2)))
    old = None
    if os.path.exists(path):
        old = latency_lib.load_table(path, space_id=latency_measure.space_id(space), batch_size=int(L.batch_size),
                                     dtype=latency_measure.DTYPE)
        here = dict(timer.describe(), host=latency_measure.host())
        timing = {"warmup": timer.warmup, "repeats": timer.repeats, "rounds": timer.rounds,
                  "statistic": timer.statistic}
        if any(old.get(k) != v for k, v in here.items()) or old.get("timing") != timing:
            log(f"latency: {path} was measured on {old.get('host')} ({old.get('device_kind')}, "
                 f"{old.get('runtime')}) with {old.get('timing')}: measuring every part again here with {timing}")
            old = None
    table = latency_measure.build_table(timer, space, latency_measure.DTYPE, old, log=log)
    if jax.process_index() == 0:
        latency_lib.save_table(path, table)  # the parts are kept if the validation is interrupted
    t_parts = time.perf_counter() - t0
    table, rows, report = latency_fit.measure_and_validate(
        timer, space, table, fit_subnets=int(L.fit_subnets), validate_subnets=int(L.validate_subnets),
        seed=int(L.seed), log=log)
    report["seconds"] = {"parts": t_parts, "total": time.perf_counter() - t0}
    report["targets"] = dict(latency_fit.TARGETS)
    report["note"] = ("wall-clock medians on this machine while it ran whatever else it runs: "
                      "on a shared machine the figures are noisy")
    doc = {"report": report, "table": path, "device": timer.describe(), "batch_size": int(L.batch_size),
           "rows": rows}
    if jax.process_index() == 0:
        latency_lib.save_table(path, table)
        atomic_write(os.path.join(directory, "validation.json"), json.dumps(doc, indent=1))
        latency_fit.plot_validation(os.path.join(directory, "validation.png"), rows, report,
                                        f"{space.name}, batch {L.batch_size}, {timer.describe()['device_kind']}")
    log(latency_fit.format_report(report))
    short = latency_fit.shortfall(report)
    if short:
        log(f"latency: below the targets: {short}")
    log(f"latency: table {path} ({len(table['entries'])} parts), validation in {directory} "
         f"({report['seconds']['total']:.0f} s)")
    return report


def best_subnet_under(front: list[dict], max_mflops: float) -> dict:
    fits = [r for r in front if r["mflops"] <= max_mflops]
    if not fits:
        raise errors.ConfigError(f"no searched subnet has at most {max_mflops} MFLOPs (smallest: "
                                 f"{min(r['mflops'] for r in front):.2f}); raise export.max_mflops")
    return max(fits, key=lambda r: (r["top1"], -r["mflops"]))


def best_subnet_under_latency(front: list[dict], max_ms: float, path: str) -> dict:
    """The most accurate front row whose predicted `latency_ms` is at most `max_ms`."""
    if not all("latency_ms" in r for r in front):
        raise errors.ConfigError(f"{path} was searched without a latency table (search.objective=flops): rerun "
                                 f"--mode=search --config.search.objective=latency, or use export.max_mflops")
    fits = [r for r in front if r["latency_ms"] <= max_ms]
    if not fits:
        raise errors.ConfigError(f"no searched subnet is predicted at most {max_ms} ms (fastest: "
                                 f"{min(r['latency_ms'] for r in front):.3f} ms); raise export.max_latency_ms")
    return max(fits, key=lambda r: (r["top1"], -r["latency_ms"]))


def export_task(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Calibrates the chosen subnet and writes it as a standalone model directory."""
    space = get_space(config.space)
    e = config.export
    fmt = onnx_export.check_format(e.get("format", "flax"))  # before any work
    front = None
    if e.subnet:
        subnet = as_subnet(e.subnet, space)
    elif e.max_mflops > 0 or e.get("max_latency_ms", 0.0) > 0:
        path = os.path.join(workdir, "search", "pareto.json")
        if not os.path.exists(path):
            raise errors.PathNotFoundError(f"{path} is missing: run the search first (--mode=search) or name a "
                                           f"subnet with --config.export.subnet")
        front, front_context = search_results.read_front(path, space)  # a malformed file fails here, naming it
        if e.get("max_latency_ms", 0.0) > 0:  # the predicted latency the front was searched with
            pick = best_subnet_under_latency(front, e.max_latency_ms, path)
        else:
            pick = best_subnet_under(front, e.max_mflops)
        subnet = SubnetConfig.from_dict(pick["subnet"], space)
    else:
        raise errors.ConfigError("export needs export.subnet (a preset name or JSON file) or export.max_mflops "
                                 "(the best searched subnet within that budget)")
    mesh = mesh_lib.make_mesh(config.mesh.data)
    _check_eval_batches(config, mesh)
    variables, weights = load_weights(config, workdir, mesh)
    source = weights["description"]
    if front is not None:  # the pick is the best for the weights and settings the front was searched with
        search_results.check_front_context(path, front_context, search_context(config, weights, variables))
    model = train_lib.make_model(config, space, for_training=False)
    calib, evals = train_lib.eval_iterators(config)
    calibrated = eval_lib.calibrate_bn(model, variables, subnet, calib(), mesh=mesh,
                                       num_batches=config.eval.calib_batches)
    row = eval_lib.evaluate(model, calibrated, subnet, evals(), mesh=mesh)
    static, sliced = export_lib.extract_subnet(jax.device_get(calibrated), subnet, space,
                                               bn_eps=float(config.model.bn_eps))
    directory = e.directory or os.path.join(workdir, "export")
    if jax.process_index() == 0:
        export_lib.save_subnet(directory, static, jax.device_get(sliced), extra={
            "weights": source, "mflops": count_flops(subnet, space), "top1": row["top1"], "top5": row["top5"]})
        if fmt == "onnx":  # beside the Flax directory: the same calibrated weights, BN folded
            onnx_path = onnx_export.save_onnx(directory, jax.device_get(calibrated), subnet, space,
                                              bn_eps=float(config.model.bn_eps),
                                              doc=f"alphanet-jax subnet {subnet.to_json()}")
            log(f"wrote {onnx_path} (input {onnx_export.INPUT_NAME}: float32 NCHW at {subnet.resolution})")
    log(f"exported {subnet.to_json()} ({count_flops(subnet, space):.2f} MFLOPs, "
        f"{count_params(subnet, space):,} params, top-1 {row['top1']:.2f}%) to {directory}\n"
        f"load it with: alphanet_jax.export.load_subnet_model({directory!r})")
    return directory


# The command-line tasks, in the order a run with several of them runs them.
TASKS: dict[str, Callable[[ml_collections.ConfigDict, str], Any]] = {
    "train": train_task, "evaluate": evaluate_task, "search": search_task, "export": export_task,
    "latency": latency_task}


def run(config: ml_collections.ConfigDict, workdir: str, mode: str = "") -> dict:
    """Runs the tasks of `mode` (or config.run) in order; returns their results.

    Bad inputs fail before any work (nothing loaded or compiled): the tasks, the search space, the
    config values and the workdir (a writable directory). A write that fails because the disk is
    full becomes a WorkdirError naming the path.
    """
    tasks = parse_tasks(mode or config.run)
    get_space(config.space)  # a bad space fails before anything else
    config_check.validate_config(config, tasks)
    config_check.check_workdir(workdir)
    mesh_lib.initialize_distributed(config.distributed)
    cache = compile_cache.enable(config.get("compile_cache", "auto"))
    if cache is not None:
        log(f"XLA compilation cache: {cache} (config.compile_cache; 'none' turns it off)")
    try:
        return _run_tasks(config, workdir, tasks)
    except Exception as e:
        message = errors.disk_full_message(e, workdir)
        if message is None:
            raise
        raise errors.WorkdirError(message) from e


def _run_tasks(config: ml_collections.ConfigDict, workdir: str, tasks: list[str]) -> dict:
    results: dict[str, Any] = {}
    t0 = time.perf_counter()
    for task in tasks:
        t = time.perf_counter()
        results[task] = TASKS[task](config, workdir)
        if task == "train" and results[task]["interrupted"]:
            break  # SIGTERM: the checkpoint is saved, the later tasks run after the resume
        results.setdefault("seconds", {})[task] = time.perf_counter() - t
    results["seconds_total"] = time.perf_counter() - t0
    if jax.process_index() == 0 and len(tasks) > 1:
        atomic_write(os.path.join(workdir, "results.json"), json.dumps(results, indent=1, default=str))
        log(f"done in {results['seconds_total']:.0f} s: results.json, search/pareto.png, export/ in {workdir}")
    return results
