"""``python -m pipeline.runs`` on a real MLflow store (SQLite) written by the test."""

from __future__ import annotations

import io

import pandas as pd
from mlflow.tracking import MlflowClient

from pipeline import runs
from pipeline.tracking import RUN_NAME_TAG


def test_list_shows_the_trials_of_a_sweep_with_their_differing_params(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("sweeps", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(experiment, tags={RUN_NAME_TAG: "sweep"}).info.run_id
    for trial, (mask, accuracy) in enumerate(((32, 0.4), (64, 0.6))):
        run_id = client.create_run(experiment, tags={RUN_NAME_TAG: f"sweep-t{trial}", "mlflow.parentRunId": parent,
                                                     "checkpoint_location": f"s3://b/sweep-t{trial}"}).info.run_id
        client.log_param(run_id, "masking.mask_patches", mask)
        client.log_param(run_id, "optim.lr", 0.001)  # the same in both: not a column
        client.log_metric(run_id, "probe_val_accuracy", accuracy)
        client.set_terminated(run_id, "FINISHED")
    client.create_run(experiment, tags={RUN_NAME_TAG: "unrelated"})

    assert runs.main(["--tracking-uri", uri, "--experiment", "sweeps", "list", "--parent", "sweep", "--csv"]) == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert list(table["run"]) == ["sweep-t0", "sweep-t1"] and set(table["status"]) == {"FINISHED"}
    assert list(table["param.masking.mask_patches"]) == [32, 64] and "param.optim.lr" not in table
    assert list(table["probe_val_accuracy"]) == [0.4, 0.6]
    assert list(table["checkpoint_location"]) == ["s3://b/sweep-t0", "s3://b/sweep-t1"]

    assert runs.main(["--tracking-uri", uri, "--experiment", "sweeps", "show", "sweep-t1"]) == 0
    shown = capsys.readouterr().out
    assert "run sweep-t1" in shown and "masking.mask_patches: 64" in shown and "probe_val_accuracy: 0.6" in shown

    assert runs.main(["--tracking-uri", uri, "--experiment", "nope", "list"]) == 2
    assert "no experiment 'nope' in this store (experiments: Default, sweeps)" in capsys.readouterr().err
