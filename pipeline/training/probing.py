"""Downstream probes inside the pretraining loop: is the encoder becoming useful, in numbers that compare
across mask ratios and objectives (docs/probes.md).

Driver side, before Ray Train starts: :func:`choose_probe_set` reads the probe task's layout and draws a
fixed, seeded subset of its training and held-out clips, refusing a set that cannot score anything (one
class, no held-out clips) before Ray starts; :func:`probe_dataset` featurizes its audio once (a re-run
reuses the shards) and makes the Ray Dataset of its examples, which every worker reads whole.

Worker side, every ``probe.every`` steps: a :class:`Prober` has each worker embed its share of the
clips (row ``i`` on worker ``i mod world_size``, read at the first probe and then kept in memory) with
the frozen encoder, gathers every embedding on every
worker in clip order, and scores them there with ``ssamba.probes``: each worker computes the same numbers,
whatever the number of workers, and no worker waits on a collective the others skip.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import numpy as np
import ray
import torch

from pipeline.config import ConfigError, ExamplesConfig, ProbeConfig, S3Config
from pipeline.data import featurizer
from pipeline.data.examples import examples_dataset, labelled_rows
from pipeline.data.layouts import TaskData, read_task
from pipeline.data.sources import AudioSource, SourceError
from pipeline.training.loop import all_gather_rows
from pipeline.training.trainer import Worker
from ssamba import SSAMBAEncoder
from ssamba.metrics import accuracy, mean_average_precision
from ssamba.probes import clip_embeddings, embedding_size, knn_scores, logistic_scores

PROBE_DATASET = "probe"


@dataclass(frozen=True)
class ProbeSet:
    """The clips a run probes, in a fixed order: each one's URI, positive classes and whether it is held out."""

    classes: tuple[str, ...]
    sources: tuple[AudioSource, ...]
    targets: tuple[tuple[int, ...], ...]
    held_out: tuple[bool, ...]

    @property
    def uris(self) -> list[str]:
        return [source.uri for source in self.sources]


def training_and_held_out(data: TaskData) -> tuple[list[AudioSource], list[AudioSource]]:
    """Which clips the probes fit on and which they score: the ``train`` split against ``validation``
    (else ``test``); for a task with folds, every other fold against the first."""
    folds = sorted({source.fold for source in data.sources if source.fold is not None})
    if folds:
        return ([s for s in data.sources if s.fold != folds[0]], data.fold(folds[0]))
    return data.split("train"), data.split("validation") or data.split("test")


def _sample(sources: list[AudioSource], count: int, rng: random.Random) -> list[AudioSource]:
    return sources if len(sources) <= count else sorted(rng.sample(sources, count))


def choose_probe_set(config: ProbeConfig, storage: S3Config) -> ProbeSet:
    """The task's clips, cut to ``max_clips`` by a seeded draw that keeps the share of held-out clips.
    Raises :class:`ConfigError` naming the field for a set the probes cannot score."""
    try:
        data = read_task(config.task, config.data_root, storage)
    except SourceError as error:
        raise ConfigError(f"probe.data_root: {error}") from None
    train, held_out = training_and_held_out(data)
    if not held_out:
        raise ConfigError(f"probe.data_root: the {config.task} task at {config.data_root} has no held-out clips "
                          "(a validation or test split, or folds) to score the probes on")
    total = len(train) + len(held_out)
    held_count = min(len(held_out), max(1, round(config.max_clips * len(held_out) / total)))
    rng = random.Random(config.seed)
    held_out = _sample(held_out, held_count, rng)
    train = _sample(train, config.max_clips - len(held_out), rng)
    labels = {label for source in train for label in source.targets}
    if len(labels) < 2:
        raise ConfigError(f"probe.data_root: the probe's training clips carry {len(labels)} class"
                          f"{'' if len(labels) == 1 else 'es'} ({', '.join(sorted(labels)) or 'no labels'}): a probe "
                          "needs at least two")
    classes = tuple(sorted({label for source in train + held_out for label in source.targets}))
    index = {name: i for i, name in enumerate(classes)}
    clips = [(source, False) for source in train] + [(source, True) for source in held_out]
    return ProbeSet(classes, tuple(source for source, _ in clips),
                    tuple(tuple(index[label] for label in source.targets) for source, _ in clips),
                    tuple(flag for _, flag in clips))


def _probe_rows(batch: dict[str, np.ndarray], position: dict[str, int], targets: dict[str, tuple[int, ...]],
                held_out: tuple[bool, ...], num_classes: int) -> dict[str, np.ndarray]:
    """Keep the probe set's rows, each with its place in the set, its multi-hot target and its split."""
    keep, target = labelled_rows(batch, targets, num_classes)
    indices = np.array([position[uri] for uri in batch["uri"][keep]], dtype=np.int64)
    return {"fbank": batch["fbank"][keep], "frames": batch["frames"][keep], "index": indices,
            "held_out": np.array([held_out[clip] for clip in indices], dtype=bool), "target": target}


def probe_dataset(config: ProbeConfig, probe_set: ProbeSet, examples: ExamplesConfig, storage: S3Config,
                  num_mel_bins: int) -> ray.data.Dataset:
    """Featurize the probe set's audio (reusing finished shards) and return its examples, cropped and
    normalised as the training examples are, not augmented."""
    featurizer.featurize_listed(list(probe_set.sources), config.features, storage, num_mel_bins)
    settings = ExamplesConfig(features=config.features, target_length=examples.target_length, norm=examples.norm,
                              shuffle=False)
    position = {uri: index for index, uri in enumerate(probe_set.uris)}
    return examples_dataset(settings, storage).map_batches(
        _probe_rows, fn_kwargs={"position": position, "targets": dict(zip(probe_set.uris, probe_set.targets)),
                                "held_out": probe_set.held_out,
                                "num_classes": len(probe_set.classes)})


# --------------------------------------------------------------------------------------------------
# In the training loop
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeShare:
    """This worker's clips of the probe set (clip ``i`` when ``i mod world_size == rank``), read through Ray
    Data once and then held in host memory: every later probe costs only its forward passes, not another
    read and decode of the probe set while the training input is in flight.

    ``labels`` rows are ``[index, held_out, target…]``; ``fbank`` is the examples as the probe set's Ray
    Dataset gives them (cropped and normalised, float32)."""

    fbank: torch.Tensor
    frames: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def read(cls, worker: Worker) -> ProbeShare:
        fbanks, frames, labels = [], [], []
        for batch in worker.dataset(PROBE_DATASET).iter_torch_batches(batch_size=256):
            mine = batch["index"] % worker.world_size == worker.rank
            fbanks.append(batch["fbank"][mine])
            frames.append(batch["frames"][mine])
            labels.append(torch.cat([batch["index"][mine, None].float(), batch["held_out"][mine, None].float(),
                                     batch["target"][mine]], dim=1))
        if not labels:  # nothing readable: the probe says so after the gather
            return cls(torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, 0))
        return cls(torch.cat(fbanks), torch.cat(frames), torch.cat(labels))


class Prober:
    """The probes of one training worker: :meth:`scores` at every probe step, its share read at the first."""

    def __init__(self, config: ProbeConfig, worker: Worker, num_classes: int) -> None:
        self.config, self.worker, self.num_classes = config, worker, num_classes
        self._share: ProbeShare | None = None

    @torch.no_grad()
    def _embed_share(self, encoder: SSAMBAEncoder, autocast: Callable[[], ContextManager]) -> torch.Tensor:
        """This worker's rows ``[index, held_out, target…, embedding…]`` (float32, on the worker's device)."""
        if self._share is None:
            self._share = ProbeShare.read(self.worker)
        share, device, step = self._share, self.worker.device, self.config.batch_size
        grid = encoder.config.grid
        width = 2 + self.num_classes + embedding_size(grid, encoder.embed_dim, self.config.pooling)
        rows = [torch.empty(0, width, device=device)]
        for start in range(0, share.labels.shape[0], step):
            with autocast():
                encoded = encoder(share.fbank[start:start + step].to(device))
            embedded = clip_embeddings(encoded.float(), grid, self.config.pooling,
                                       share.frames[start:start + step].to(device))
            rows.append(torch.cat([share.labels[start:start + step].to(device), embedded], dim=1))
        return torch.cat(rows)

    def scores(self, encoder: SSAMBAEncoder, autocast: Callable[[], ContextManager]) -> dict[str, float]:
        """The probes of the current encoder (frozen, eval mode, no masking), the same on every worker.
        Every worker must call it at the same step: the gather is a collective."""
        was_training = encoder.training
        encoder.eval()
        try:
            rows = all_gather_rows(self._embed_share(encoder, autocast))
        finally:
            encoder.train(was_training)
        if rows.shape[0] == 0:
            raise RuntimeError(f"probe: no clip of {self.config.features} could be read (see its quarantine)")
        rows = rows[rows[:, 0].argsort()]  # clip order, whichever worker embedded a clip
        classes = self.num_classes
        return score(self.config, rows[:, 2 + classes:], rows[:, 2:2 + classes], rows[:, 1] > 0.5)


def score(config: ProbeConfig, embeddings: torch.Tensor, targets: torch.Tensor, held_out: torch.Tensor) -> dict[str, float]:
    """Every configured probe's metric on the held-out clips (accuracy, or mAP for multi-label tasks)."""
    metric = mean_average_precision if config.multi_label else accuracy
    train, test = embeddings[~held_out], embeddings[held_out]
    scores = {}
    for method in config.methods:
        if method == "knn":
            predicted = knn_scores(train, targets[~held_out], test, config.k, config.temperature)
        else:
            predicted = logistic_scores(train, targets[~held_out], test, config.weight_decay, config.multi_label)
        scores[config.metric(method)] = metric(predicted, targets[held_out])
    return scores


@dataclass
class ProbeHistory:
    """What a run's probes have said so far, saved in its checkpoints: the latest scores, the best score of
    each metric with its step and, when ``train.select_by`` names a probe metric, the model's state at
    that metric's best step (rank 0 only: it exports it)."""

    latest: dict[str, float] = field(default_factory=dict)
    best: dict[str, tuple[float, int]] = field(default_factory=dict)
    selected_state: dict[str, torch.Tensor] | None = None
    selected_step: int | None = None

    def observe(self, scores: dict[str, float], step: int, select_by: str,
                model_state: Callable[[], dict[str, torch.Tensor]] | None) -> None:
        """Record one probe's scores; keep ``model_state()`` when it beats the best ``select_by`` so far."""
        self.latest = dict(scores)
        for name, value in scores.items():
            if name not in self.best or value > self.best[name][0]:
                self.best[name] = (value, step)
                if name == select_by and model_state is not None:
                    self.selected_state, self.selected_step = model_state(), step

    def metrics(self) -> dict[str, float]:
        """The latest scores, and each metric's best (``best_<metric>``) with its step (``best_<metric>_step``)."""
        best = {f"best_{name}": value for name, (value, _) in self.best.items()}
        steps = {f"best_{name}_step": float(step) for name, (_, step) in self.best.items()}
        return {**self.latest, **best, **steps}

    def state_dict(self) -> dict:
        return {"latest": self.latest, "best": {name: list(pair) for name, pair in self.best.items()},
                "selected_state": self.selected_state, "selected_step": self.selected_step}

    def load_state_dict(self, state: dict) -> None:
        self.latest = dict(state["latest"])
        self.best = {name: (float(value), int(step)) for name, (value, step) in state["best"].items()}
        self.selected_state, self.selected_step = state["selected_state"], state["selected_step"]
