"""The command-line tasks behind launch.py: train, evaluate, search, export.

Each task reads the config and a workdir, and writes its results there:
  train     -> checkpoints/, tensorboard/, metrics.jsonl
  evaluate  -> eval.json (and a printed table): BN calibration + top-1/top-5 of named subnets
  search    -> search/ (evaluated.jsonl, pareto.json/.csv/.png)
  export    -> export/ (a standalone subnet: config.json + variables.npz)
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

from alphanet_jax import config_check
from alphanet_jax import data as data_lib
from alphanet_jax import errors
from alphanet_jax import evaluate as eval_lib
from alphanet_jax import export as export_lib
from alphanet_jax import fingerprint as fingerprint_lib
from alphanet_jax import mesh as mesh_lib
from alphanet_jax import onnx_export
from alphanet_jax import search as search_lib
from alphanet_jax import train as train_lib
from alphanet_jax.flops import count_flops, count_params
from alphanet_jax.search_space import PRESET_TITLES, SubnetConfig, as_subnet, get_space

TASKS = ("train", "evaluate", "search", "export")


def _log(*args: Any) -> None:
    if jax.process_index() == 0:
        print(*args, flush=True)


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


def _factories(config: ml_collections.ConfigDict, calib_batches: int, local: bool) -> tuple[Callable, Callable]:
    """Calibration and evaluation iterator factories (per host, or whole-split when `local`)."""
    e = config.eval
    pi, pc = (0, 1) if local else (jax.process_index(), jax.process_count())

    def calib():
        return data_lib.make_calibration_iterator(config.data, batch_size=e.calib_batch_size // pc,
                                                  seed=e.calib_seed, process_index=pi, process_count=pc)

    def evals():
        return data_lib.make_eval_iterator(config.data, batch_size=e.batch_size // pc, process_index=pi,
                                           process_count=pc)

    return calib, evals


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


def run_evaluate(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    """Calibrate and evaluate `eval.subnets`; prints a table and writes eval.json."""
    space = get_space(config.space)
    subnets = _subnet_list(config)  # bad names fail before any compilation
    mesh = mesh_lib.make_mesh(config.mesh.data)
    _check_eval_batches(config, mesh)
    variables, source = load_supernet(config, workdir, mesh)
    model = train_lib.make_model(config, space, for_training=False)
    calib, evals = _factories(config, config.eval.calib_batches, local=False)
    rows = []
    for name, subnet in subnets:
        row = eval_lib.calibrate_and_evaluate(model, variables, subnet, calib(), evals(), mesh=mesh,
                                              num_calib_batches=config.eval.calib_batches)
        rows.append(dict(row, name=name))
    _log(f"weights: {source}\n" + format_table(rows))
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "eval.json"), "w") as f:
            json.dump({"weights": source, "results": rows}, f, indent=1)
    return rows


def run_search(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    """Evolutionary search over the trained supernet; results in workdir/search."""
    space = get_space(config.space)
    s = config.search
    # Each host evaluates its own candidates on its local devices over the whole val split.
    mesh = eval_lib.local_mesh()
    _check_eval_batches(config, mesh)
    variables, weights = load_weights(config, workdir, mesh_lib.make_mesh(config.mesh.data))
    variables = jax.device_get(variables)
    # Stored results are reused only for the same weights (by content) and calibration/eval settings.
    context = search_context(config, weights, variables)
    model = train_lib.make_model(config, space, for_training=False)
    calib, evals = _factories(config, s.calib_batches, local=True)
    evaluate_fn = eval_lib.make_evaluate_fn(model, variables, calib, evals, mesh=mesh,
                                            num_calib_batches=s.calib_batches)
    presets = {}
    if space.name == "alphanet":
        presets = search_lib.evaluate_presets(evaluate_fn, space)
    cfg = {k: v for k, v in s.to_dict().items() if k != "calib_batches"}
    _log(f"evolutionary search on {weights['description']} (weights {context['weights']['fingerprint'][:12]}): "
         f"{s.evo_iter} generations, window [{s.flops_min}, {s.flops_max}] MFLOPs")
    front = search_lib.run_search(evaluate_fn, space, cfg, os.path.join(workdir, "search"),
                                  preset_results=presets, log=_log, context=context)
    rows = [dict(r, name=f"pareto {i}") for i, r in enumerate(front)]
    _log(format_table(rows))
    return front


def best_subnet_under(front: list[dict], max_mflops: float) -> dict:
    fits = [r for r in front if r["mflops"] <= max_mflops]
    if not fits:
        raise errors.ConfigError(f"no searched subnet has at most {max_mflops} MFLOPs (smallest: "
                                 f"{min(r['mflops'] for r in front):.2f}); raise export.max_mflops")
    return max(fits, key=lambda r: (r["top1"], -r["mflops"]))


def run_export(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Calibrates the chosen subnet and writes it as a standalone model directory."""
    space = get_space(config.space)
    e = config.export
    fmt = onnx_export.check_format(e.get("format", "flax"))  # before any work
    front = None
    if e.subnet:
        subnet = as_subnet(e.subnet, space)
    elif e.max_mflops > 0:
        path = os.path.join(workdir, "search", "pareto.json")
        if not os.path.exists(path):
            raise errors.PathNotFoundError(f"{path} is missing: run the search first (--mode=search) or name a "
                                           f"subnet with --config.export.subnet")
        front, front_context = search_lib.read_front(path, space)  # a malformed file fails here, naming it
        subnet = SubnetConfig.from_dict(best_subnet_under(front, e.max_mflops)["subnet"], space)
    else:
        raise errors.ConfigError("export needs export.subnet (a preset name or JSON file) or export.max_mflops "
                                 "(the best searched subnet within that budget)")
    mesh = mesh_lib.make_mesh(config.mesh.data)
    _check_eval_batches(config, mesh)
    variables, weights = load_weights(config, workdir, mesh)
    source = weights["description"]
    if front is not None:  # the pick is the best for the weights and settings the front was searched with
        search_lib.check_front_context(path, front_context, search_context(config, weights, variables))
    model = train_lib.make_model(config, space, for_training=False)
    calib, evals = _factories(config, config.eval.calib_batches, local=False)
    calibrated = eval_lib.calibrate_bn(model, variables, subnet, calib(), mesh=mesh,
                                       num_batches=config.eval.calib_batches)
    row = eval_lib.evaluate(model, calibrated, subnet, evals(), mesh=mesh)
    static, sliced = export_lib.extract_subnet(jax.device_get(calibrated), subnet, space)
    directory = e.directory or os.path.join(workdir, "export")
    if jax.process_index() == 0:
        export_lib.save_subnet(directory, static, jax.device_get(sliced), extra={
            "weights": source, "mflops": count_flops(subnet, space), "top1": row["top1"], "top5": row["top5"]})
        if fmt == "onnx":  # beside the Flax directory: the same calibrated weights, BN folded
            onnx_path = onnx_export.save_onnx(directory, jax.device_get(calibrated), subnet, space,
                                              bn_eps=float(config.model.bn_eps), doc=f"alphanet-jax subnet {subnet.to_json()}")
            _log(f"wrote {onnx_path} (input {onnx_export.INPUT_NAME}: float32 NCHW at {subnet.resolution})")
    _log(f"exported {subnet.to_json()} ({count_flops(subnet, space):.2f} MFLOPs, "
         f"{count_params(subnet, space):,} params, top-1 {row['top1']:.2f}%) to {directory}\n"
         f"load it with: alphanet_jax.export.load_subnet_model({directory!r})")
    return directory


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
        if task == "train":
            out = train_lib.train_and_evaluate(config, workdir)
            results["train"] = {k: v for k, v in out.items() if k != "state"}
            if out["interrupted"]:
                break
        elif task == "evaluate":
            results["evaluate"] = run_evaluate(config, workdir)
        elif task == "search":
            results["search"] = run_search(config, workdir)
        elif task == "export":
            results["export"] = run_export(config, workdir)
        results.setdefault("seconds", {})[task] = time.perf_counter() - t
    results["seconds_total"] = time.perf_counter() - t0
    if jax.process_index() == 0 and len(tasks) > 1:
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
        _log(f"done in {results['seconds_total']:.0f} s: results.json, search/pareto.png, export/ in {workdir}")
    return results
