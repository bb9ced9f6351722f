"""``python -m pipeline.runs``: the runs of an experiment or a sweep as a table, from any tracking URI.

    python -m pipeline.runs list --experiment ssamba-local-tune [--parent SWEEP] [--csv]
    python -m pipeline.runs show RUN_NAME --experiment ssamba-local

``list`` prints one row per run: its name, status, the parameters that differ between the listed runs,
its summary metrics (the last value of each) and where its models are (checkpoints, classifier,
logged MLflow models). ``--parent`` lists a sweep's trials or a fine-tuning job's folds. ``show``
prints one run's parameters, metrics, tags and logged models. The tracking URI is
``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else the default local store (``outputs/mlflow.db``).
"""

from __future__ import annotations

import argparse
import sys

import pandas as pd
from mlflow.tracking import MlflowClient

from pipeline.paths import without_userinfo
from pipeline.tracking import RUN_NAME_TAG, resolve_tracking_uri

LOCATION_TAGS = ("checkpoint_location", "classifier_location")
RUN_COLUMNS = ["run", "status"]


class RunsError(RuntimeError):
    """The experiment, the parent or the run asked for is not in the store."""


def _experiment_id(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        known = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
        raise RunsError(f"no experiment {name!r} in this store (experiments: {known})")
    return experiment.experiment_id


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


def runs_table(client: MlflowClient, experiment: str, parent: str | None = None) -> pd.DataFrame:
    """One row per run: name, status, the parameters that differ, the last value of every metric, and
    where its models are."""
    experiment_id = _experiment_id(client, experiment)
    runs, models = _runs(client, experiment_id, parent), _models(client, experiment_id)
    rows = []
    for run in runs:
        row = {"run": run.data.tags.get(RUN_NAME_TAG, run.info.run_name), "status": run.info.status}
        row.update({f"param.{key}": value for key, value in run.data.params.items()})
        row.update(run.data.metrics)
        row.update({tag: run.data.tags[tag] for tag in LOCATION_TAGS if tag in run.data.tags})
        row["models"] = "; ".join(models.get(run.info.run_id, []))
        rows.append(row)
    table = pd.DataFrame(rows, columns=None if rows else RUN_COLUMNS)
    constant = [column for column in table.columns
                if column.startswith("param.") and table[column].astype(str).nunique(dropna=False) <= 1 and len(table) > 1]
    table = table.drop(columns=constant)
    return table.drop(columns=[column for column in table.columns if table[column].astype(str).eq("").all()])


def show_run(client: MlflowClient, experiment: str, name: str) -> str:
    """One run's parameters, metrics, tags and logged models, as text."""
    experiment_id = _experiment_id(client, experiment)
    found = client.search_runs([experiment_id], filter_string=f"tags.{RUN_NAME_TAG} = '{name}'", max_results=1)
    if not found:
        raise RunsError(f"no run named {name!r} in experiment {experiment!r}")
    run = found[0]
    lines = [f"run {name} ({run.info.run_id}): {run.info.status}", "params:"]
    lines += [f"  {key}: {value}" for key, value in sorted(run.data.params.items())]
    lines += ["metrics (last value):", *[f"  {key}: {value:.6g}" for key, value in sorted(run.data.metrics.items())]]
    lines += ["tags:", *[f"  {key}: {value}" for key, value in sorted(run.data.tags.items())
                          if not key.startswith("mlflow.log-model")]]
    lines += ["models:", *[f"  {model}" for model in _models(client, experiment_id).get(run.info.run_id, [])]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else outputs/mlflow.db)")
    parser.add_argument("--experiment", required=True, help="MLflow experiment name")
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="the runs of the experiment, or of a sweep (--parent), as a table")
    listing.add_argument("--parent", help="only the child runs of this run (a sweep's trials, a job's folds)")
    listing.add_argument("--csv", action="store_true", help="CSV instead of a text table")
    showing = commands.add_parser("show", help="one run in full")
    showing.add_argument("run", help="the run's name")
    args = parser.parse_args(argv)
    uri = resolve_tracking_uri(args.tracking_uri)
    client = MlflowClient(uri)
    try:
        if args.command == "show":
            print(show_run(client, args.experiment, args.run))
            return 0
        table = runs_table(client, args.experiment, args.parent)
    except RunsError as error:
        print(f"error: {error} ({without_userinfo(uri)})", file=sys.stderr)
        return 2
    print(table.to_csv(index=False) if args.csv else table.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
