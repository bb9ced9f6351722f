"""``python -m pipeline.runs`` on a real MLflow store (SQLite) written by the test."""

from __future__ import annotations

import io

import pandas as pd
from mlflow.tracking import MlflowClient

from pipeline import runs
from pipeline.runtime.tracking import RUN_NAME_TAG


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


def test_list_without_an_experiment_names_the_experiments_and_a_run_list_fits_the_terminal(tmp_path, capsys,
                                                                                           monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("pretraining", artifact_location=(tmp_path / "art").as_uri())
    for name, lr, knn in (("small-mask", 0.001, 0.62), ("large-mask", 0.002, 0.71)):
        run_id = client.create_run(experiment, tags={RUN_NAME_TAG: name}).info.run_id
        for key, value in {"optim.lr": lr, "storage.endpoint": None, **{f"model.field{i}": i for i in range(60)}}.items():
            client.log_param(run_id, key, value)
        for step in (1, 2, 3):
            client.log_metric(run_id, "loss", 5.0 - step, step=step)
            client.log_metric(run_id, "lr", lr, step=step)
        for step, value in ((2, knn - 0.1), (3, knn)):
            client.log_metric(run_id, "probe_knn_accuracy", value, step=step)
            client.log_metric(run_id, "best_probe_knn_accuracy", knn, step=step)
        client.set_terminated(run_id, "FINISHED")

    assert runs.main(["--tracking-uri", uri, "list"]) == 0
    listed = capsys.readouterr().out
    assert "pretraining" in listed and "Default" in listed and "--experiment NAME" in listed

    monkeypatch.setenv("COLUMNS", "130")
    assert runs.main(["list", "--tracking-uri", uri, "--experiment", "pretraining"]) == 0  # options after the command
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split()
    assert header[:5] == ["run", "status", "started", "duration", "step"] and "loss" in header
    assert "probe_knn_accuracy" in header and "best_probe_knn_accuracy" in header
    assert not any(column.startswith("param.") for column in header) and "lr" not in header
    assert all(len(line) <= 130 for line in lines)
    assert lines[1].split()[0] == "small-mask" and lines[1].split()[5] == "3"  # its last step

    monkeypatch.setenv("COLUMNS", "40")
    assert runs.main(["--tracking-uri", uri, "--experiment", "pretraining", "list"]) == 0
    narrow = capsys.readouterr().out.splitlines()
    assert all(len(line) <= 40 for line in narrow[:-1]) and "left out to fit" in narrow[-1]

    assert runs.main(["--tracking-uri", uri, "--experiment", "pretraining", "list", "--columns", "run,param.optim.lr"]) == 0
    chosen = capsys.readouterr().out.split()
    assert chosen[:2] == ["run", "param.optim.lr"] and "0.002" in chosen
    assert runs.main(["--tracking-uri", uri, "--experiment", "pretraining", "list", "--columns", "nope"]) == 2
    assert "no column nope" in capsys.readouterr().err

    assert runs.main(["--tracking-uri", uri, "compare", "small-mask", "large-mask", "--experiment", "pretraining"]) == 0
    compared = capsys.readouterr().out
    assert "param.optim.lr" in compared and "param.model.field1" not in compared  # only what differs
    assert "probe_knn_accuracy" in compared and "0.62" in compared and "0.71" in compared
    assert runs.main(["--tracking-uri", uri, "show", "small-mask"]) == 2
    assert "show needs --experiment" in capsys.readouterr().err
