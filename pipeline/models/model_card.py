"""Every exported encoder and classifier, published one way: the model file beside the run's checkpoints,
as a run artifact and as an MLflow model (:func:`publish`), with its model card: what the model is, what
it saw, how it was chosen and where it came from, as ``MODEL_CARD.md`` beside the model file (and in
MLflow) and as JSON inside the file itself (``metadata["model_card"]``), so the facts travel with the
weights.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from importlib import metadata as package_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from pipeline.data.storage import Location
    from pipeline.runtime.tracking import RunTracker

CARD_FILE = "MODEL_CARD.md"
PACKAGE = "ssamba-ray"


def project_version() -> str:
    try:
        return package_metadata.version(PACKAGE)
    except package_metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class ModelCard:
    """The facts of one exported model; every value is plain JSON data."""

    kind: str  # "encoder" or "classifier"
    run: str
    run_id: str
    architecture: dict[str, Any]
    parameters: int
    objective: dict[str, Any]
    data: dict[str, Any]  # features location, clips, hours of audio
    training: dict[str, Any]  # steps or epochs
    selected_by: dict[str, Any]  # why this model (which step), and the metrics that chose it
    fbank: dict[str, Any]
    labels: list[str] = field(default_factory=list)
    commit: str | None = None
    version: str = field(default_factory=project_version)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def markdown(self) -> str:
        """The card as a short markdown page."""
        def table(values: dict[str, Any]) -> list[str]:
            return ["| | |", "|---|---|", *[f"| {key} | {value} |" for key, value in values.items()]]

        lines = [f"# SSAMBA {self.kind}: {self.run}", "",
                 f"MLflow run `{self.run_id}`; project {self.version}" + (f" at commit `{self.commit}`" if self.commit else ""),
                 "", "## Architecture", "", *table({**self.architecture, "parameters": f"{self.parameters:,}"}),
                 "", "## Objective", "", *table(self.objective), "", "## Data", "", *table(self.data),
                 "", "## Training", "", *table(self.training), "", "## Selected by", "", *table(self.selected_by),
                 "", "## Features (Kaldi fbank)", "", *table(self.fbank)]
        if self.labels:
            lines += ["", "## Labels", "", ", ".join(self.labels)]
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Export:
    """One exported model: its file in this project's weights-only format, its card, and the module and
    example input MLflow logs it with (``name``: the MLflow model's name; ``tags``: its version's tags)."""

    file_name: str
    data: bytes
    card: ModelCard
    module: torch.nn.Module
    example: torch.Tensor
    name: str
    tags: dict[str, str]


def publish(export: Export, run_folder: Location, tracker: RunTracker, register_as: str | None) -> None:
    """The model and its card beside the run's checkpoints (where jobs load it from), both as run artifacts
    under ``model/``, and the model as an MLflow model registered as ``register_as``."""
    card = export.card.markdown().encode()
    run_folder.join(CARD_FILE).write_bytes(card)
    tracker.log_bytes(card, CARD_FILE, "model")
    run_folder.join(export.file_name).write_bytes(export.data)
    tracker.log_bytes(export.data, export.file_name, "model")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / export.file_name
        path.write_bytes(export.data)
        tracker.log_model(export.module, export.example, export.name, path, register_as, export.tags)
