"""``python -m pipeline.tune``: Ray Tune sweeps over pretraining masks and fine-tuning recipes, in MLflow.

    python -m pipeline.tune --config configs/tune/<sweep>.yaml [--set key=value ...]

* ``sweep: mask`` — each trial pretrains with its sampled masking: a Tune trial function drives a Ray
  Train run whose reports reach Tune through ``TuneReportCallback``. With ``pretrain.probe`` the run
  probes its own encoder as it trains and every report carries the scores (``probe_knn_accuracy``...),
  so ASHA stops weak mask counts mid-run (its grace period and rungs count optimizer steps). With a
  ``probe`` section instead, the finished trial's encoder is scored by a linear probe (a second Ray
  Train run) and the trial reports ``probe_<metric>`` once.
* ``sweep: finetune`` — each trial fine-tunes with its sampled recipe inside the trial (a plain Tune
  function trainable holding the configured resources), reporting and checkpointing every epoch, so
  ASHA can stop weak trials and a restored trial continues from its last epoch.

The task's audio is featurized once, before the first trial. Relaunching with the same ``name``
resumes the sweep (``Tuner.restore``): finished trials are kept, unfinished and failed ones continue
from their checkpoints. The saved sweep keeps its search space and algorithm: a changed ``search``
section applies to new sweeps only.

MLflow: the sweep is a parent run (its search space as params); every trial is a child run named
``<sweep>-<trial id>`` (its whole config, the sampled fields included, as params; its reports as
metrics; the probe nested below it). At the end the parent gets the best trial's sampled values as
``best.<field>`` params, its metrics as ``best.<metric>``, and ``trials.json``: one row per trial.
"""

from __future__ import annotations

import json
import math
import numbers
import sys
from typing import Any, Callable

import pandas as pd
import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import BasicVariantGenerator, Searcher
from ray.tune.search.optuna import OptunaSearch

from pipeline import finetune, pretrain
from pipeline.config import ConfigError, public_dict
from pipeline.config.sweep import TuneJobConfig, with_values
from pipeline.data.layouts import TaskData
from pipeline.data.sources import SourceError
from pipeline.data.storage import Location, resolve
from pipeline.runtime import run_record
from pipeline.runtime.launch import Input, mlflow_ui_hint, run_command
from pipeline.runtime.resources import DATA_CPUS, sweep_concurrency, train_cpus
from pipeline.runtime.tracking import RunOutcome, RunTracker, resolve_tracking_uri, run_status

SAVED_SWEEP = "tuner.pkl"  # where Ray Tune saves a sweep for Tuner.restore
# Fields of a trial's own results that describe the trial rather than the model.
_BOOKKEEPING = {"checkpoint_path", "trial_id", "done", "training_iteration", "time_this_iter_s", "time_total_s",
                "timestamp", "date", "hostname", "node_ip", "pid", "time_since_restore", "iterations_since_restore",
                "checkpoint_dir_name", "should_checkpoint"}


def sweep_metric(config: TuneJobConfig) -> str:
    """The metric trials are ranked by."""
    if config.metric:
        return config.metric
    if config.probes_in_loop:
        return config.pretrain.probe.metrics[0]
    if config.sweep == "mask":
        return "probe_" + finetune.validation_metric(config.probe)
    return finetune.validation_metric(config.finetune)


def trial_run_name(sweep_name: str) -> str:
    """The name of the current trial's runs (Ray Train checkpoints and MLflow): stable across restores."""
    return f"{sweep_name}-{tune.get_context().get_trial_id()}"


def _in_sweep(job, values: dict[str, Any], run_name: str, tracking_uri: str, experiment: str):
    """A trial's job config: the sampled values, its run name, the sweep's MLflow store and experiment."""
    return with_values(job, {**values, "name": run_name, "tracking.tracking_uri": tracking_uri,
                             "tracking.experiment": experiment})


def mask_trial(values: dict[str, Any], sweep: TuneJobConfig, task: TaskData | None, tracking_uri: str,
               parent_run_id: str) -> None:
    """Pretrain with the sampled masking (reports reach Tune at every checkpoint and probe), then, unless
    the pretraining probed itself, probe linearly."""
    run_name = trial_run_name(sweep.name)
    experiment = sweep.tracking.experiment
    pretrain_config = _in_sweep(sweep.pretrain, values, run_name, tracking_uri, experiment)
    # The sweep checked its config on launch; a restored trial's run follows the sweep's.
    result = pretrain.run(pretrain_config, callbacks=[TuneReportCallback()], parent_run_id=parent_run_id,
                          accept_config_changes=True)
    if sweep.probes_in_loop:
        return
    trial_run = RunTracker(tracking_uri, experiment, run_name)  # the pretraining run, reopened
    probe_config = _in_sweep(sweep.probe, {"model.checkpoint": pretrain.encoder_uri(pretrain_config),
                                           "model.freeze_encoder": True}, f"{run_name}-probe", tracking_uri, experiment)
    last_report = result.metrics or {}  # empty when a restored trial finds its run already finished
    with run_status(trial_run):
        summary = finetune.train_splits(probe_config, task, parent_run_id=trial_run.run_id)
        scores = {"probe_" + finetune.validation_metric(probe_config): summary["selected"],
                  **{f"probe_{key}": value for key, value in summary.items()
                     if key.startswith("test_") and value is not None}}
        trial_run.log_metrics(scores, step=int(last_report.get("step", 0)))
    pretraining = {key: value for key, value in last_report.items() if key not in _BOOKKEEPING}
    tune.report({**pretraining, **scores})


def finetune_trial(values: dict[str, Any], sweep: TuneJobConfig, task: TaskData, tracking_uri: str,
                   parent_run_id: str) -> None:
    """Fine-tune with the sampled recipe in this trial, reporting every epoch to Tune."""
    run_name = trial_run_name(sweep.name)
    config = _in_sweep(sweep.finetune, values, run_name, tracking_uri, sweep.tracking.experiment)
    finetune.train_in_trial(config, task, parent_run_id)


TRIALS: dict[str, Callable[..., None]] = {"mask": mask_trial, "finetune": finetune_trial}


def trial_resources(config: TuneJobConfig) -> dict[str, float]:
    """Mask trials only drive Ray Train runs: no CPU (one byte of memory, as Tune needs the trial to
    reserve something; none when a custom resource pins them); fine-tuning trials train in place (one
    CPU unless configured)."""
    cpu = config.resources.cpu
    if cpu is None:
        cpu = 1.0 if config.sweep == "finetune" else 0.0
    driver_only = {"memory": 1} if cpu == 0 and not config.resources.gpu and not config.resources.custom else {}
    return {"cpu": cpu, "gpu": config.resources.gpu, **driver_only, **config.resources.custom}


def concurrent_trials(config: TuneJobConfig) -> int:
    """How many trials run at once: the configured bound, capped at what the cluster's CPUs fit (each
    trial with its Train workers and its own input pipeline); says so when it caps."""
    held = trial_resources(config)["cpu"]
    if config.probes_in_loop:
        held += train_cpus(config.pretrain.scaling)
    elif config.sweep == "mask":
        held += max(train_cpus(config.pretrain.scaling), train_cpus(config.probe.scaling))
    cluster = ray.cluster_resources().get("CPU", 0.0)
    configured = config.search.max_concurrent_trials
    concurrency = sweep_concurrency(cluster, held, configured, "search.max_concurrent_trials")
    if configured and concurrency < configured:
        print(f"tune: {concurrency} trials at a time, not {configured}: each needs {held + DATA_CPUS:g} of the "
              f"cluster's {cluster:g} CPUs (its Train workers and input pipeline)", flush=True)
    return concurrency


def _trial_folder(trial) -> str:
    return trial.trial_id


def search_algorithm(config: TuneJobConfig, concurrent: int) -> tuple[Searcher | BasicVariantGenerator, int | None]:
    """What proposes the trials, and the concurrency Tune must bound around it: Tune bounds it around a
    searcher (Optuna); the random/grid generator bounds it itself (None)."""
    if config.search.algorithm == "optuna":
        return OptunaSearch(seed=config.search.seed), concurrent
    return BasicVariantGenerator(random_state=config.search.seed, max_concurrent=concurrent), None


def param_space(config: TuneJobConfig) -> dict:
    """Tune's search space: each swept field's domain."""
    return {field: dimension.domain() for field, dimension in config.search.space.items()}


def _new_tuner(config: TuneJobConfig, trainable, storage_path: str, filesystem, concurrent: int) -> tune.Tuner:
    search = config.search
    metric = sweep_metric(config)
    algorithm, concurrency = search_algorithm(config, concurrent)
    if search.scheduler == "asha":  # rungs in epochs (fine-tuning) or optimizer steps (pretraining)
        steps = config.probes_in_loop
        scheduler = ASHAScheduler(time_attr="step" if steps else "training_iteration",
                                  max_t=config.pretrain.train.max_steps if steps else config.finetune.epochs,
                                  grace_period=search.grace_period, reduction_factor=search.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    # Mask trials probed after pretraining report progress before their score exists, so Tune must not
    # require the metric in every result: they are ranked after the sweep instead.
    ranked_by_tune = config.sweep == "finetune" or config.probes_in_loop
    return tune.Tuner(
        trainable,
        param_space=param_space(config),
        tune_config=tune.TuneConfig(
            metric=metric if ranked_by_tune else None, mode=config.mode if ranked_by_tune else None,
            search_alg=algorithm, scheduler=scheduler, num_samples=search.num_samples,
            max_concurrent_trials=concurrency, trial_dirname_creator=_trial_folder),
        run_config=tune.RunConfig(
            name=config.name, storage_path=storage_path, storage_filesystem=filesystem,
            failure_config=tune.FailureConfig(max_failures=config.max_failures),
            # Fine-tuning trials checkpoint every epoch: keep the best two (and, always, the latest), so
            # that a restored trial whose newest checkpoint is damaged has an older one to resume from.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=metric,
                                                    checkpoint_score_order=config.mode)
            if config.sweep == "finetune" else None),
    )


def build_tuner(config: TuneJobConfig, root: Location, trainable, concurrent: int) -> tuple[tune.Tuner, bool]:
    """A new sweep in ``root`` (the sweep's storage), or the saved one with the same name (second value:
    whether it was restored)."""
    filesystem = root.filesystem if root.is_s3 else None
    storage_path = root.path if root.is_s3 else root.uri
    experiment = root.join(config.name)
    experiment_path = experiment.path if root.is_s3 else experiment.uri
    if tune.Tuner.can_restore(experiment_path, storage_filesystem=filesystem):
        return tune.Tuner.restore(experiment_path, trainable, resume_unfinished=True, resume_errored=True,
                                  storage_filesystem=filesystem), True
    return _new_tuner(config, trainable, storage_path, filesystem, concurrent), False


def _status(result: tune.Result) -> str:
    """How a trial ended. A restored trial keeps its earlier error on record, so its last result
    (``done``: finished, or stopped by the scheduler) decides."""
    if (result.metrics or {}).get("done"):
        return "finished"
    return "error" if result.error else "unfinished"


def trial_table(results: tune.ResultGrid, config: TuneJobConfig, metric: str) -> pd.DataFrame:
    """One row per trial: its sampled values, its best report on ``metric`` (all of that report's
    metrics), how many reports it made and how it ended."""
    rows = []
    for result in results:
        history = result.metrics_dataframe
        row: dict[str, Any] = {"trial_id": (result.metrics or {}).get("trial_id"),
                               "run_name": f"{config.name}-{(result.metrics or {}).get('trial_id')}"}
        row.update({field: result.config.get(field) for field in config.search.space})
        if history is not None and metric in history and history[metric].notna().any():
            best_index = history[metric].idxmax() if config.mode == "max" else history[metric].idxmin()
            best = history.loc[best_index]
            row.update({key: best[key] for key in history.columns
                        if key not in _BOOKKEEPING and not key.startswith("config/")})
        row["reports"] = 0 if history is None else len(history)
        if history is not None and "step" in history:
            row["last_step"] = int(history["step"].max())
        row["status"] = _status(result)
        rows.append(row)
    return pd.DataFrame(rows)


def _best_row(table: pd.DataFrame, metric: str, mode: str) -> pd.Series | None:
    scored = table[table[metric].notna()] if metric in table else table.iloc[0:0]
    if scored.empty:
        return None
    return scored.loc[scored[metric].idxmax() if mode == "max" else scored[metric].idxmin()]


_RUN_STATUS = {"finished": "FINISHED", "error": "FAILED", "unfinished": "KILLED"}


def close_trial_runs(table: pd.DataFrame, config: TuneJobConfig, tracking_uri: str, parent_run_id: str) -> None:
    """Give every trial's MLflow run the status of how the trial ended: FINISHED (ASHA's early stops
    included), FAILED, or KILLED when the sweep was interrupted before the trial finished."""
    for row in table.itertuples():
        tracker = RunTracker(tracking_uri, config.tracking.experiment, row.run_name, parent_run_id=parent_run_id)
        early = row.status == "finished" and _stopped_early(config, row)
        tracker.set_tags({"sweep_trial_status": "stopped_early" if early else row.status})
        tracker.finish(_RUN_STATUS[row.status])


def _stopped_early(config: TuneJobConfig, row) -> bool:
    """A finished trial that did not train to its end: ASHA stopped it."""
    if config.sweep == "finetune":
        return row.reports < config.finetune.epochs
    return config.probes_in_loop and getattr(row, "last_step", config.pretrain.train.max_steps) < config.pretrain.train.max_steps


def sweep_status(table: pd.DataFrame) -> str:
    """The parent run's status: KILLED when the sweep stopped with trials unfinished (Ctrl-C), FAILED
    when a trial failed, else FINISHED."""
    statuses = set(table["status"]) if "status" in table else set()
    return "KILLED" if "unfinished" in statuses else "FAILED" if "error" in statuses else "FINISHED"


def run(config: TuneJobConfig, accept_config_changes: bool = False) -> dict:
    """Run (or resume) the sweep; returns the best trial's values and metrics and the trial count.
    The parent run ends FINISHED, FAILED (a trial failed: relaunch to resume) or KILLED. A restore
    whose config changed is refused before Ray starts unless the changes are accepted."""
    storage = resolve(config.storage_path, config.storage)
    refuse_unrecorded_sweep(config, storage)
    with run_record.named_run(config, "pipeline.tune", config.resources.gpu > 0, accept_config_changes) as tracking:
        return _launch(config, storage, tracking)


def refuse_unrecorded_sweep(config: TuneJobConfig, storage: Location) -> None:
    """Restoring a sweep unpickles its saved state (Ray's ``tuner.pkl``): only a sweep this project
    launched, whose run record is there to match, is restored."""
    folder = storage.join(config.name)
    if folder.join(SAVED_SWEEP).exists() and not folder.join(run_record.CONFIG_FILE).exists():
        raise ConfigError(f"name: {folder} holds a saved sweep ({SAVED_SWEEP}) but no run record "
                          f"({run_record.CONFIG_FILE}); restoring it would unpickle whatever it holds. Use another "
                          "name, or delete the folder to start the sweep over")


def _launch(config: TuneJobConfig, storage: Location, tracking: run_record.TrackingSetup) -> dict:
    concurrent = concurrent_trials(config)  # a sweep the cluster cannot hold fails here, before any run is opened
    tracking_uri = resolve_tracking_uri(config.tracking.tracking_uri)
    metric = sweep_metric(config)
    parent = RunTracker(tracking_uri, config.tracking.experiment, config.name, tags={"sweep": config.sweep},
                        source_tags=tracking.source_tags)
    if not parent.resumed:
        parent.log_params({"sweep": config.sweep, "metric": metric, "mode": config.mode,
                           "algorithm": config.search.algorithm, "scheduler": config.search.scheduler,
                           "num_samples": config.search.num_samples,
                           **{f"space.{field}": d.describe() for field, d in config.search.space.items()}})
        parent.log_dict(public_dict(config), "sweep_config.json")
    with run_status(parent) as outcome:
        return _sweep(config, storage, parent, tracking_uri, metric, outcome, concurrent)


def _sweep(config: TuneJobConfig, storage: Location, parent: RunTracker, tracking_uri: str, metric: str,
           outcome: RunOutcome, concurrent: int) -> dict:
    """The sweep under its parent run: featurize, tune, close the trials' runs, log the best trial."""
    task = None if config.probes_in_loop else finetune.prepare(config.probe if config.sweep == "mask" else config.finetune)
    if config.probes_in_loop:  # featurized once here, not by concurrent trials
        pretrain.prepare_probe(config.pretrain)
    trainable = tune.with_resources(
        tune.with_parameters(TRIALS[config.sweep], sweep=config, task=task, tracking_uri=tracking_uri,
                             parent_run_id=parent.run_id),
        trial_resources(config))
    tuner, restored = build_tuner(config, storage, trainable, concurrent)
    parent.set_tags({"restored": str(restored)})
    results = tuner.fit()

    table = trial_table(results, config, metric)
    close_trial_runs(table, config, tracking_uri, parent.run_id)
    parent.log_table(table, "trials.json")
    best = _best_row(table, metric, config.mode)
    summary: dict[str, Any] = {"trials": len(table), "errors": results.num_errors, "metric": metric}
    if best is not None:
        values = {field: best[field] for field in config.search.space}
        metrics = {key: float(best[key]) for key in best.index
                   if key not in values and key not in ("trial_id", "run_name", "status", "reports")
                   and isinstance(best[key], numbers.Real) and math.isfinite(best[key])}
        if results.num_errors == 0:  # params are final: a failed sweep's best may change when it resumes
            parent.log_params({f"best.{field}": value for field, value in values.items()})
        parent.log_metrics({f"best.{key}": value for key, value in metrics.items()}, step=0)
        parent.set_tags({"best_trial_id": str(best["trial_id"]), "best_run_name": str(best["run_name"])})
        summary.update(best_trial=best["trial_id"], best_values=values, best_metrics=metrics)
    outcome.status = sweep_status(table)
    return summary


def inputs(config: TuneJobConfig) -> list[Input]:
    """What must exist before the sweep starts: the base jobs' inputs (a mask trial makes its probe's encoder)."""
    def within(section: str, items: list[Input]) -> list[Input]:
        return [Input(f"{section}.{item.field}", item.uri, item.kind) for item in items]

    if config.probes_in_loop:
        return within("pretrain", pretrain.inputs(config.pretrain))
    if config.sweep == "mask":
        return [*within("pretrain", pretrain.inputs(config.pretrain)), Input("probe.data_root", config.probe.data_root)]
    return within("finetune", finetune.inputs(config.finetune))


def report(config: TuneJobConfig, summary: dict) -> str:
    tracking_uri = resolve_tracking_uri(config.tracking.tracking_uri)
    return json.dumps(summary, default=str) + "\n" + mlflow_ui_hint(tracking_uri, config.tracking.experiment)


def main(argv: list[str] | None = None) -> int:
    return run_command(__doc__.splitlines()[0], TuneJobConfig,
                       lambda config, args: report(config, run(config, args.accept_config_changes)), argv,
                       (SourceError,), inputs=inputs, accept_changes_flag=True)


if __name__ == "__main__":
    from pipeline.tune import main as imported_main  # not __main__'s copy: Ray pickles those by value

    sys.exit(imported_main())
