"""``python -m pipeline.runs``: the experiments, runs and sweeps of a tracking store, from a terminal.

    python -m pipeline.runs list                                         # the experiments
    python -m pipeline.runs list --experiment ssamba-local               # its runs, a compact table
    python -m pipeline.runs list --experiment ssamba-local-tune --parent local-mask-sweep   # a sweep's trials
    python -m pipeline.runs list --experiment ssamba-local --columns run,loss,lr            # columns of your choice
    python -m pipeline.runs list --experiment ssamba-local --csv         # every column, as CSV
    python -m pipeline.runs show RUN --experiment ssamba-local           # one run in full
    python -m pipeline.runs compare RUN RUN ... --experiment ssamba-local  # what differs between runs

``list`` prints one row per run: name, status, start, duration, the last step it logged, its key metrics
and, for runs that probe their encoder, the latest and the best probe scores; columns that do not fit
the terminal are left out (and named). ``--columns`` picks any of the full table's columns: ``param.<field>``
for the parameters that differ between the listed runs, every metric (its last value), the checkpoint
and classifier locations and the logged ``models``. ``--parent`` lists a sweep's trials or a fine-tuning
job's folds. ``show`` prints one run's parameters, metrics, tags and logged models; ``compare`` the
parameters that differ between runs and their metrics side by side. The tracking URI is
``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else the default local store (``outputs/mlflow.db``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import sys

import pandas as pd
from mlflow.tracking import MlflowClient

from pipeline.data.paths import without_userinfo
from pipeline.runtime.tracking import RUN_NAME_TAG, resolve_tracking_uri

LOCATION_TAGS = ("checkpoint_location", "classifier_location")
RUN_COLUMNS = ["run", "status"]
SUMMARY_COLUMNS = ["run", "status", "started", "duration", "step"]
# The metrics a compact table shows when a run has them, in this order: pretraining, fine-tuning, sweeps.
KEY_METRICS = ("loss", "val_masked_accuracy", "val_loss", "train_loss", "val_accuracy", "test_accuracy", "val_mAP",
               "test_mAP", "mean_accuracy", "probe_val_accuracy")
PROBE_METRICS = tuple(f"{best}probe_{method}_{score}" for method in ("knn", "linear") for score in ("accuracy", "mAP")
                      for best in ("", "best_"))
STEP_METRICS = ("loss", "train_loss")  # logged at every step (pretraining) or epoch (fine-tuning)


class RunsError(RuntimeError):
    """The experiment, the parent or the run asked for is not in the store."""


def _experiment_id(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        known = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
        raise RunsError(f"no experiment {name!r} in this store (experiments: {known})")
    return experiment.experiment_id


def experiments_table(client: MlflowClient) -> pd.DataFrame:
    """One row per experiment: its name, how many runs it holds and when the newest started."""
    rows = []
    for experiment in sorted(client.search_experiments(), key=lambda e: e.name):
        runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
        rows.append({"experiment": experiment.name, "runs": len(runs),
                     "last_started": _time(runs[0].info.start_time) if runs else ""})
    return pd.DataFrame(rows, columns=["experiment", "runs", "last_started"])


def _runs(client: MlflowClient, experiment_id: str, parent: str | None) -> list:
    runs = client.search_runs([experiment_id], order_by=["attributes.start_time ASC"])
    if parent is None:
        return runs
    parents = [run for run in runs if run.data.tags.get(RUN_NAME_TAG) == parent]
    if not parents:
        raise RunsError(f"no run named {parent!r} in this experiment")
    return [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]


def _models(client: MlflowClient, experiment_id: str) -> dict[str, list[str]]:
    """Logged MLflow models by the run that logged them."""
    found: dict[str, list[str]] = {}
    for model in client.search_logged_models(experiment_ids=[experiment_id]):
        if model.source_run_id:
            found.setdefault(model.source_run_id, []).append(f"{model.name}: {model.model_uri}")
    return found


def _time(milliseconds: int | None) -> str:
    if milliseconds is None:
        return ""
    return dt.datetime.fromtimestamp(milliseconds / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M")


def _duration(run) -> str:
    end = run.info.end_time or dt.datetime.now(dt.UTC).timestamp() * 1000
    return str(dt.timedelta(seconds=round((end - run.info.start_time) / 1000)))


def _last_step(client: MlflowClient, run) -> int | None:
    for name in STEP_METRICS:
        if name in run.data.metrics:
            return max(metric.step for metric in client.get_metric_history(run.info.run_id, name))
    return None


def runs_table(client: MlflowClient, experiment: str, parent: str | None = None) -> pd.DataFrame:
    """One row per run: name, status, start, duration, last step, the parameters that differ, the last
    value of every metric, and where its models are."""
    experiment_id = _experiment_id(client, experiment)
    runs, models = _runs(client, experiment_id, parent), _models(client, experiment_id)
    rows = []
    for run in runs:
        row = {"run": run.data.tags.get(RUN_NAME_TAG, run.info.run_name), "status": run.info.status,
               "started": _time(run.info.start_time), "duration": _duration(run), "step": _last_step(client, run)}
        row.update({f"param.{key}": value for key, value in run.data.params.items()})
        row.update(run.data.metrics)
        row.update({tag: run.data.tags[tag] for tag in LOCATION_TAGS if tag in run.data.tags})
        row["models"] = "; ".join(models.get(run.info.run_id, []))
        rows.append(row)
    table = pd.DataFrame(rows, columns=None if rows else RUN_COLUMNS)
    constant = [column for column in table.columns
                if column.startswith("param.") and table[column].astype(str).nunique(dropna=False) <= 1 and len(table) > 1]
    table = table.drop(columns=constant)
    table = table.drop(columns=[column for column in table.columns if table[column].isna().all()])
    return table.drop(columns=[column for column in table.columns if table[column].astype(str).eq("").all()])


def compact_columns(table: pd.DataFrame) -> list[str]:
    """The default columns of ``list``: the run's summary, its key metrics and probe scores where present."""
    wanted = [*SUMMARY_COLUMNS, *KEY_METRICS, *PROBE_METRICS]
    return [column for column in wanted if column in table.columns]


def fit_to_width(table: pd.DataFrame, width: int) -> tuple[str, list[str]]:
    """The table as text, leaving out trailing columns until its lines fit ``width`` characters (the
    first two always stay); returns the text and the columns left out."""
    columns, dropped = list(table.columns), []
    while True:
        text = table[columns].to_string(index=False, float_format=lambda value: f"{value:.4g}")
        if len(columns) <= 2 or max(len(line) for line in text.splitlines()) <= width:
            return text, dropped
        dropped.insert(0, columns.pop())


def show_run(client: MlflowClient, experiment: str, name: str) -> str:
    """One run's parameters, metrics, tags and logged models, as text."""
    experiment_id = _experiment_id(client, experiment)
    run = _named_run(client, experiment_id, experiment, name)
    lines = [f"run {name} ({run.info.run_id}): {run.info.status}", "params:"]
    lines += [f"  {key}: {value}" for key, value in sorted(run.data.params.items())]
    lines += ["metrics (last value):", *[f"  {key}: {value:.6g}" for key, value in sorted(run.data.metrics.items())]]
    lines += ["tags:", *[f"  {key}: {value}" for key, value in sorted(run.data.tags.items())
                          if not key.startswith("mlflow.log-model")]]
    lines += ["models:", *[f"  {model}" for model in _models(client, experiment_id).get(run.info.run_id, [])]]
    return "\n".join(lines)


def _named_run(client: MlflowClient, experiment_id: str, experiment: str, name: str):
    found = client.search_runs([experiment_id], filter_string=f"tags.{RUN_NAME_TAG} = '{name}'", max_results=1)
    if not found:
        raise RunsError(f"no run named {name!r} in experiment {experiment!r}")
    return found[0]


def compare_runs(client: MlflowClient, experiment: str, names: list[str]) -> pd.DataFrame:
    """The parameters that differ between the runs, then every metric's last value: a row per field, a
    column per run."""
    experiment_id = _experiment_id(client, experiment)
    runs = [_named_run(client, experiment_id, experiment, name) for name in names]
    params = sorted({key for run in runs for key in run.data.params})
    differing = [key for key in params if len({run.data.params.get(key) for run in runs}) > 1]
    metrics = sorted({key for run in runs for key in run.data.metrics})
    rows = {f"param.{key}": [run.data.params.get(key, "") for run in runs] for key in differing}
    rows.update({key: [_number(run.data.metrics.get(key)) for run in runs] for key in metrics})
    return pd.DataFrame.from_dict(rows, orient="index", columns=names)


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    shared = argparse.ArgumentParser(add_help=False)  # before or after the command, as users type them
    shared.add_argument("--tracking-uri", default=argparse.SUPPRESS,
                        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else outputs/mlflow.db)")
    shared.add_argument("--experiment", default=argparse.SUPPRESS, help="MLflow experiment name")
    parser.add_argument("--tracking-uri", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--experiment", default=None, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", parents=[shared], help="the experiments, or an experiment's runs as a table")
    listing.add_argument("--parent", help="only the child runs of this run (a sweep's trials, a job's folds)")
    listing.add_argument("--columns", help="comma-separated columns instead of the compact default")
    listing.add_argument("--csv", action="store_true", help="CSV instead of a text table (every column by default)")
    showing = commands.add_parser("show", parents=[shared], help="one run in full")
    showing.add_argument("run", help="the run's name")
    comparing = commands.add_parser("compare", parents=[shared], help="runs side by side: differing params, metrics")
    comparing.add_argument("runs", nargs="+", help="the runs' names")
    return parser


def _listing(client: MlflowClient, args: argparse.Namespace) -> str:
    if args.experiment is None:
        return experiments_table(client).to_string(index=False) + "\n(--experiment NAME lists its runs)"
    table = runs_table(client, args.experiment, args.parent)
    if args.columns:
        columns = [column.strip() for column in args.columns.split(",") if column.strip()]
        unknown = [column for column in columns if column not in table.columns]
        if unknown:
            raise RunsError(f"no column {', '.join(unknown)} in this table (columns: {', '.join(table.columns)})")
        table = table[columns]
    if args.csv:
        return table.to_csv(index=False).rstrip("\n")
    if not args.columns:
        table = table[compact_columns(table)]
    text, dropped = fit_to_width(table, shutil.get_terminal_size().columns)
    if not dropped:
        return text
    columns = "column" if len(dropped) == 1 else "columns"
    return text + f"\n({len(dropped)} {columns} left out to fit: {', '.join(dropped)}; --columns chooses)"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    uri = resolve_tracking_uri(args.tracking_uri)
    client = MlflowClient(uri)
    try:
        if args.command == "list":
            print(_listing(client, args))
            return 0
        if args.experiment is None:
            raise RunsError(f"{args.command} needs --experiment NAME")
        if args.command == "show":
            print(show_run(client, args.experiment, args.run))
        else:
            print(compare_runs(client, args.experiment, args.runs).to_string())
    except RunsError as error:
        print(f"error: {error} ({without_userinfo(uri)})", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
