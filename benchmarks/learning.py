"""Does pretraining learn? Pretrain a small SSAMBA on real recordings for a fixed CPU budget, then
compare frozen-embedding linear probes against the same encoder at random init and a log-mel baseline.

    nice -n 5 .venv/bin/python benchmarks/learning_data.py          # once: the data and manifests
    nice -n 5 .venv/bin/python benchmarks/learning.py --minutes 30  # the benchmark

1. ``pipeline.featurize`` stores the fbanks of the unlabelled pool (long files in clips of the
   pretraining length) and of each labelled task.
2. A few pretraining steps of the chosen ``--objective`` (``masked_patches``, the paper's, or
   ``teacher_student``) are timed in this process at the workers' thread count; ``max_steps`` is
   what fits in ``--minutes`` (or ``--steps``), so both objectives get the same compute.
   ``pipeline.pretrain`` then pretrains on Ray Train, tracked in MLflow (``<out>/mlflow.db``).
3. Each labelled clip is embedded by the pretrained encoder and the same architecture at random init
   (output tokens over the patch columns the clip covers, pooled as their mean, their mean and
   standard deviation, the mean of each frequency row, each row's mean and standard deviation, and
   the [CLS] output),
   and by the mean and standard deviation over time of its normalised log-mel frames (the whole
   clip, and only the frames the encoder sees). ``--probe-step N`` skips pretraining and probes a stopped run's step-N checkpoint.
4. A multinomial logistic regression per embedding (features standardised on the train split, L2
   weight chosen on the validation split) is scored on the test split; the splits are group-disjoint
   (see learning_data.py).

The table (test accuracy, in %) is printed and written to ``<out>/results.csv`` and ``results.md``;
``<out>/run.json`` records the arguments, the timing and the data sizes.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray
import torch
from mlflow.tracking import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline import featurize, pretrain
from pipeline.config import FeaturizeConfig, PretrainJobConfig
from pipeline.runtime.launch import start_local_ray
from ssamba import TARGET_NORMS, SSAMBAEncoder, crop_or_pad, load_checkpoint, norm_stats, normalize

TASKS = ("voice", "language")
POOLINGS = ("mean", "mean/std", "band means", "band mean/std", "mean + band means", "[CLS]")


def embedding_name(encoder: str, pooling: str) -> str:
    return encoder if pooling == "mean" else f"{encoder} {pooling}"


EMBEDDINGS = ("pretrained", "random init", "log-mel mean/std", "log-mel mean/std, encoder's crop",
              *(embedding_name(encoder, pooling) for pooling in POOLINGS[1:] for encoder in ("pretrained", "random init")))
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)
TIME_SHARE = 0.85  # of --minutes for optimizer steps; the rest: evaluations, checkpoints, start-up


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("outputs/learning/data"), help="learning_data.py's cache")
    parser.add_argument("--out", type=Path, default=Path("outputs/learning/run"))
    parser.add_argument("--name", default="learning", help="pretraining run name (a rerun with it resumes)")
    parser.add_argument("--minutes", type=float, default=30.0, help="pretraining budget; max_steps is derived from it")
    parser.add_argument("--steps", type=int, default=None, help="fixed max_steps instead of --minutes")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--patch", type=int, default=16, help="square patch = stride")
    parser.add_argument("--target-length", type=int, default=256, help="frames per clip (10 ms each)")
    parser.add_argument("--objective", choices=("masked_patches", "teacher_student"), default="masked_patches")
    parser.add_argument("--mask-ratio", type=float, default=None,
                        help="fraction of patches masked (default: 0.4 masked_patches, 0.8 teacher_student)")
    parser.add_argument("--passes", type=int, choices=(1, 2), default=2,
                        help="masked_patches: 2 is the official InfoNCE and MSE passes")
    parser.add_argument("--clones", type=int, default=4, help="teacher_student: masks per clip sharing a teacher pass")
    parser.add_argument("--block-size", type=int, default=3, help="teacher_student: side of the visible blocks")
    parser.add_argument("--top-k-blocks", type=int, default=2, help="teacher_student: teacher stages averaged")
    parser.add_argument("--ema-decay", type=float, nargs=2, default=(0.99, 0.999), metavar=("START", "END"),
                        help="teacher_student: EMA decay, annealed linearly over the run")
    parser.add_argument("--decoder-dim", type=int, default=64, help="teacher_student: width of the decoder")
    parser.add_argument("--target-norm", choices=TARGET_NORMS, default="instance",
                        help="teacher_student: per-stage normalisation of the teacher's targets")
    parser.add_argument("--reconstruction-weight", type=float, default=0.0,
                        help="teacher_student: weight of an added MSE reconstruction of the masked fbank patches")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--evaluations", type=int, default=5, help="validation evaluations during pretraining")
    parser.add_argument("--pool-files", type=int, default=None, help="pretrain on the first N pool files only (smoke runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker-cpus", type=int, default=os.cpu_count() or 1,
                        help="threads of the one Train worker (Ray gets one more logical CPU for Ray Data's reads)")
    parser.add_argument("--probe-step", type=int, default=None, help="no pretraining: probe the named run's "
                        "training checkpoint of this step (a run stopped before its end)")
    parser.add_argument("--online-probe", choices=(*TASKS, "none"), default="voice",
                        help="the task pretraining probes itself on at every evaluation (probe section)")
    parser.add_argument("--online-pooling", choices=("bands", "mean", "both"), default="bands",
                        help="the online probe's pooling")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# Pretraining through the pipeline
# --------------------------------------------------------------------------------------------------


def first_rows(manifest: Path, rows: int, destination: Path) -> Path:
    """A manifest of the first ``rows`` rows of ``manifest``, its URIs made absolute."""
    with manifest.open(newline="") as handle:
        kept = list(csv.DictReader(handle))[:rows]
    destination.parent.mkdir(parents=True, exist_ok=True)
    with destination.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["uri", "label", "split"])
        writer.writeheader()
        writer.writerows({**row, "uri": str((manifest.parent / row["uri"]).resolve())} for row in kept)
    return destination


def featurize_manifest(manifest: Path, output: Path, max_seconds: float | None) -> None:
    audio = {"max_seconds": max_seconds, "long_audio": "chunk", "min_seconds": 0.5} if max_seconds else {}
    config = FeaturizeConfig.model_validate({"input": {"manifest": str(manifest)}, "output": str(output),
                                             "audio": audio, "shard_size": 64})
    print(featurize.run(config).table())


def mask_ratio(args: argparse.Namespace) -> float:
    if args.mask_ratio is not None:
        return args.mask_ratio
    return 0.8 if args.objective == "teacher_student" else 0.4


def objective(args: argparse.Namespace, max_steps: int) -> dict:
    if args.objective == "masked_patches":
        return {"kind": "masked_patches"}
    return {"kind": "teacher_student", "clones": args.clones, "mask_ratio": mask_ratio(args),
            "block_size": args.block_size, "top_k_blocks": args.top_k_blocks, "ema_decay_start": args.ema_decay[0],
            "ema_decay_end": args.ema_decay[1], "ema_anneal_steps": max_steps, "decoder_dim": args.decoder_dim,
            "target_norm": args.target_norm, "reconstruction_weight": args.reconstruction_weight}


def online_probe(args: argparse.Namespace, every: int) -> dict | None:
    """The pretraining job's probe section: the task's manifest, probed at every evaluation."""
    if args.online_probe == "none":
        return None
    return {"task": "manifest", "data_root": str((args.data / f"task_{args.online_probe}.csv").resolve()),
            "features": str((args.out / "features" / f"probe_{args.online_probe}").resolve()), "every": every,
            "pooling": args.online_pooling}


def pretrain_job(args: argparse.Namespace, max_steps: int) -> PretrainJobConfig:
    grid_patches = (128 // args.patch) * (args.target_length // args.patch)
    every = max(1, max_steps // args.evaluations)
    return PretrainJobConfig.model_validate({
        "name": args.name,
        "storage_path": str((args.out / "checkpoints").resolve()),
        "data": {"features": str((args.out / "features" / "pool_train").resolve()), "target_length": args.target_length},
        "validation": {"features": str((args.out / "features" / "pool_validation").resolve()),
                       "target_length": args.target_length, "shuffle": False},
        "model": {"size": "tiny", "embed_dim": args.width, "depth": args.depth, "patch": args.patch,
                  "target_length": args.target_length, "drop_path_rate": 0.0},
        "objective": objective(args, max_steps),
        "masking": {"mask_ratio": mask_ratio(args), "two_pass": args.passes == 2,
                    "validation_mask_patches": max(1, round(mask_ratio(args) * grid_patches))},
        "optim": {"lr": args.lr, "warmup_steps": min(args.warmup_steps, max_steps // 2), "schedule": "cosine"},
        "train": {"batch_size": args.batch_size, "max_steps": max_steps, "eval_every": every, "eval_batches": 8,
                  "checkpoint_every": every, "log_every": max(1, every // 5), "figure_every": max_steps,
                  "keep_checkpoints": args.evaluations + 1, "precision": "fp32", "seed": args.seed},
        "probe": online_probe(args, every),
        "scaling": {"num_workers": 1, "cpus_per_worker": args.worker_cpus},
        "tracking": {"tracking_uri": f"sqlite:///{(args.out / 'mlflow.db').resolve()}", "experiment": "ssamba-learning"},
    })


def step_seconds(config: PretrainJobConfig, steps: int = 3) -> float:
    """Seconds per optimizer step of this config (a teacher's EMA update included), at the Ray Train
    worker's thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(int(config.scaling.cpus_per_worker))
    torch.manual_seed(0)
    model = pretrain.pretrain_model(config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.optim.lr)
    batch = torch.randn(config.train.batch_size, config.model.target_length, config.model.num_mel_bins)
    rng = random.Random(0)
    times = []
    for step in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        optimizer.zero_grad()
        model(batch, rng).loss.backward()
        optimizer.step()
        if config.objective.teacher_student:
            model.update_teacher(step)
        times.append(time.perf_counter() - start)
    torch.set_num_threads(threads)
    return float(np.median(times[1:]))


# --------------------------------------------------------------------------------------------------
# Embeddings and probes
# --------------------------------------------------------------------------------------------------


def read_features(folder: Path) -> list[dict]:
    """The stored rows of a featurized task: label, split and the raw log-mel frames."""
    rows = []
    for shard in sorted((folder / "features").glob("*.parquet")):
        for row in pq.read_table(shard, columns=["label", "split", "n_frames", "n_mels", "fbank"]).to_pylist():
            frames = np.frombuffer(row["fbank"], dtype=np.float16).reshape(row["n_frames"], row["n_mels"])
            rows.append({"label": row["label"], "split": row["split"], "fbank": torch.from_numpy(frames.astype(np.float32))})
    return rows


def logmel_embeddings(rows: list[dict], frames: int | None = None) -> torch.Tensor:
    """Mean and standard deviation over time of the normalised log-mel frames: of the whole clip, or of
    its first ``frames`` (what the encoder sees, for a like-for-like comparison)."""
    stats = norm_stats("audioset")
    kept = [normalize(r["fbank"][:frames], stats) for r in rows]
    return torch.stack([torch.cat([frames_of_clip.mean(0), frames_of_clip.std(0, correction=0)]) for frames_of_clip in kept])


@torch.no_grad()
def encoder_embeddings(encoder: SSAMBAEncoder, rows: list[dict], target_length: int,
                       batch_size: int = 32) -> dict[str, torch.Tensor]:
    """The output patch tokens over the time columns that hold the clip (not its zero padding),
    pooled five ways: ``mean`` (D, ``pooling: mean``), ``mean/std`` (2·D), ``band means`` (the mean over
    time of each frequency row, F·D, ``pooling: bands``: it keeps the spectral envelope that a mean over
    every patch averages away), ``band mean/std`` (each row's mean and standard deviation over time,
    2·F·D: the encoder's counterpart of the log-mel baseline) and ``mean + band means`` ((F+1)·D,
    ``pooling: both``); and the ``[CLS]`` output (D: the token the teacher-student
    utterance loss trains; it also reads the zero padding)."""
    encoder.eval()
    grid, stats = encoder.config.grid, norm_stats("audioset")
    pooled: dict[str, list[torch.Tensor]] = {pooling: [] for pooling in POOLINGS}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        features = torch.stack([normalize(crop_or_pad(r["fbank"], target_length), stats) for r in chunk])
        encoded = encoder(features)
        pooled["[CLS]"].extend(encoded[:, 0])
        tokens = encoded[:, 1:].reshape(len(chunk), grid.freq_patches, grid.time_patches, -1)
        for tokens_of_clip, row in zip(tokens, chunk):
            covered = min(grid.time_patches, max(1, math.ceil(min(row["fbank"].shape[0], target_length) / grid.tstride)))
            bands = tokens_of_clip[:, :covered]  # (F, T covered, D)
            every = bands.reshape(-1, tokens.shape[-1])
            mean = every.mean(0)
            pooled["mean"].append(mean)
            pooled["mean/std"].append(torch.cat([mean, every.std(0, correction=0)]))
            band_means = bands.mean(1).flatten()
            pooled["band means"].append(band_means)
            pooled["mean + band means"].append(torch.cat([mean, band_means]))  # pooling: both
            pooled["band mean/std"].append(torch.cat([band_means, bands.std(1, correction=0).flatten()]))
    return {name: torch.stack(vectors) for name, vectors in pooled.items()}


def fit_logistic(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float) -> torch.nn.Linear:
    """Multinomial logistic regression, full batch, L-BFGS (a convex problem: the optimum, not a schedule)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(x.shape[1], classes).double()
    optimizer = torch.optim.LBFGS(model.parameters(), max_iter=500, tolerance_grad=1e-7, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y) + l2 * model.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return model


def probe(embeddings: torch.Tensor, labels: list[str], splits: list[str]) -> dict[str, float]:
    """Validation-selected L2, test accuracy; features standardised with the train split's statistics."""
    classes = sorted(set(labels))
    y = torch.tensor([classes.index(label) for label in labels])
    part = {name: torch.tensor([s == name for s in splits]) for name in ("train", "validation", "test")}
    x = embeddings.double()
    mean, std = x[part["train"]].mean(0), x[part["train"]].std(0).clamp_min(1e-6)
    x = (x - mean) / std

    def accuracy(model: torch.nn.Linear, name: str) -> float:
        with torch.no_grad():
            return 100.0 * (model(x[part[name]]).argmax(1) == y[part[name]]).double().mean().item()

    fits = [(l2, fit_logistic(x[part["train"]], y[part["train"]], len(classes), l2)) for l2 in L2_GRID]
    l2, best = max(fits, key=lambda fit: accuracy(fit[1], "validation"))
    return {"test": accuracy(best, "test"), "validation": accuracy(best, "validation"), "l2": l2}


# --------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------


def write_table(out: Path, results: dict[str, dict[str, dict]], chance: dict[str, float]) -> str:
    header = ["task", "chance", *EMBEDDINGS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    with (out / "results.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["task", "embedding", "test_accuracy", "validation_accuracy", "l2"])
        for task, by_embedding in results.items():
            for name, scores in by_embedding.items():
                writer.writerow([task, name, f"{scores['test']:.2f}", f"{scores['validation']:.2f}", scores["l2"]])
            lines.append(f"| {task} | {chance[task]:.1f} | "
                         + " | ".join(f"{by_embedding[name]['test']:.1f}" for name in EMBEDDINGS) + " |")
    table = "\n".join(lines)
    (out / "results.md").write_text(table + "\n")
    return table


def start_ray(worker_cpus: int, attempts: int = 3) -> None:
    """A Ray instance of our own, as ``ray.address: local`` starts it: the pipeline's bare
    ``ray.init()`` would join whichever cluster on this machine started last (another job's) and die
    with it. It has one logical CPU more than the worker takes, so Ray Data's reads (light: the
    features are stored) always find a slot. Retried because Ray gives a starting node a fixed 30 s,
    which a heavily loaded machine can miss."""
    for attempt in range(1, attempts + 1):
        try:
            start_local_ray(worker_cpus + 1)
            return
        except Exception as error:  # Ray raises a bare Exception on a start-up timeout
            print(f"Ray start-up attempt {attempt} failed: {error}")
            ray.shutdown()
            if attempt == attempts:
                raise


def pretrain_and_export(args: argparse.Namespace, record: dict) -> SSAMBAEncoder:
    """Featurize, pretrain on Ray Train for the budget, return the exported encoder."""
    start_ray(args.worker_cpus)
    clip_seconds = (args.target_length - 1) * 0.01 + 0.025  # exactly target_length fbank frames
    for name in ("pool_train", "pool_validation"):
        manifest = args.data / f"{name}.csv"
        if args.pool_files is not None:
            manifest = first_rows(manifest, args.pool_files, args.out / f"{name}.csv")
        featurize_manifest(manifest, args.out / "features" / name, clip_seconds)
    for task in TASKS:
        featurize_manifest(args.data / f"task_{task}.csv", args.out / "features" / f"task_{task}", None)

    if args.steps is None:
        seconds = step_seconds(pretrain_job(args, 100))
        max_steps = max(1, int(args.minutes * 60 * TIME_SHARE / seconds))
        record["measured_step_seconds"] = seconds
        print(f"one pretraining step: {seconds:.2f} s → {max_steps} steps in {args.minutes:g} minutes")
    else:
        max_steps = args.steps
    config = pretrain_job(args, max_steps)
    started = time.perf_counter()
    result = pretrain.run(config)
    record.update(max_steps=max_steps, pretrain_seconds=time.perf_counter() - started,
                  pretrain_metrics={k: v for k, v in result.metrics.items() if isinstance(v, (int, float))})
    print(f"pretrained {max_steps} steps in {record['pretrain_seconds'] / 60:.1f} min: {record['pretrain_metrics']}")
    return load_checkpoint(pretrain.encoder_uri(config)).build_encoder()


def checkpoint_encoder(config: PretrainJobConfig, step: int) -> SSAMBAEncoder:
    """The encoder of the run's training checkpoint at ``step`` (the model part of its state)."""
    state = torch.load(state_path(config, step), map_location="cpu", weights_only=True)
    model = pretrain.pretrain_model(config)
    model.load_state_dict(state["model"])
    return model.encoder


def state_path(config: PretrainJobConfig, step: int) -> Path:
    return Path(config.storage_path) / config.name / f"step-{step:08d}" / "state.pt"


POOLING_COLUMN = {"bands": "band means", "mean": "mean", "both": "mean + band means"}


def online_against_offline(args: argparse.Namespace, config: PretrainJobConfig) -> tuple[list[dict], dict]:
    """Every kept checkpoint of the run: the online probes' scores at its step (from MLflow) beside the
    offline linear probe of the same weights (validation-selected L2, test accuracy), and what the online
    probes cost (the sum of ``probe_seconds`` against the run's wall time)."""
    client = MlflowClient(config.tracking.tracking_uri)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    (run,) = client.search_runs([experiment.experiment_id], f"tags.ray_run_name = '{config.name}'")
    online = {name: {m.step: 100.0 * m.value for m in client.get_metric_history(run.info.run_id, name)}
              for name in config.probe.metrics}
    seconds = [m.value for m in client.get_metric_history(run.info.run_id, "probe_seconds")]
    rows = read_features(args.out / "features" / f"task_{args.online_probe}")
    labels, splits = [r["label"] for r in rows], [r["split"] for r in rows]
    table = []
    for folder in sorted((Path(config.storage_path) / config.name).glob("step-*")):
        step = int(folder.name.removeprefix("step-"))
        pooled = encoder_embeddings(checkpoint_encoder(config, step), rows, args.target_length)
        offline = probe(pooled[POOLING_COLUMN[args.online_pooling]], labels, splits)
        table.append({"step": step, **{name: scores.get(step) for name, scores in online.items()},
                      "offline_validation": offline["validation"], "offline_test": offline["test"]})
    return table, {"probes": len(seconds), "probe_seconds": sum(seconds)}


def ranking_disagreements(table: list[dict], online: str, offline: str = "offline_test") -> list[tuple[int, int]]:
    """Pairs of checkpoints (steps) that the online metric and the offline probe order differently."""
    scored = [row for row in table if row.get(online) is not None]
    return [(a["step"], b["step"]) for i, a in enumerate(scored) for b in scored[i + 1:]
            if (a[online] - b[online]) * (a[offline] - b[offline]) < 0]


def report_online(args: argparse.Namespace, config: PretrainJobConfig, record: dict) -> str:
    """The online-against-offline table and the probes' share of the run, as markdown."""
    table, cost = online_against_offline(args, config)
    names = config.probe.metrics
    lines = ["| step | " + " | ".join(f"online {name}" for name in names) + " | offline linear, validation | "
             "offline linear, test |", "|---|" + "---|" * (len(names) + 2)]
    for row in table:
        cells = [f"{row[name]:.1f}" if row.get(name) is not None else "–" for name in names]
        lines.append(f"| {row['step']} | " + " | ".join(cells)
                     + f" | {row['offline_validation']:.1f} | {row['offline_test']:.1f} |")
    share = cost["probe_seconds"] / record["pretrain_seconds"] if record.get("pretrain_seconds") else float("nan")
    record["online"] = {"table": table, **cost, "share_of_run": share,
                        "disagreements": {name: ranking_disagreements(table, name) for name in names}}
    lines.append(f"\n{cost['probes']} online probes took {cost['probe_seconds']:.1f} s, {100 * share:.1f} % of the "
                 f"{record.get('pretrain_seconds', float('nan')):.0f} s pretraining run")
    for name, pairs in record["online"]["disagreements"].items():
        lines.append(f"{name} orders {len(pairs)} checkpoint pairs unlike the offline test accuracy: {pairs}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    args.out.mkdir(parents=True, exist_ok=True)
    record: dict = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    if args.probe_step is None:
        pretrained = pretrain_and_export(args, record)
    else:
        pretrained = checkpoint_encoder(pretrain_job(args, args.probe_step), args.probe_step)
    torch.manual_seed(args.seed)
    random_init = SSAMBAEncoder(pretrained.config)
    results, chance, record["tasks"] = {}, {}, {}
    for task in TASKS:
        rows = read_features(args.out / "features" / f"task_{task}")
        labels, splits = [r["label"] for r in rows], [r["split"] for r in rows]
        test_labels = [label for label, split in zip(labels, splits) if split == "test"]
        chance[task] = 100.0 * max(test_labels.count(label) for label in set(test_labels)) / len(test_labels)
        record["tasks"][task] = {split: splits.count(split) for split in ("train", "validation", "test")}
        pretrained_pooled = encoder_embeddings(pretrained, rows, args.target_length)
        random_pooled = encoder_embeddings(random_init, rows, args.target_length)
        embeddings = {"log-mel mean/std": logmel_embeddings(rows),
                      "log-mel mean/std, encoder's crop": logmel_embeddings(rows, args.target_length)}
        for pooling in POOLINGS:
            embeddings[embedding_name("pretrained", pooling)] = pretrained_pooled[pooling]
            embeddings[embedding_name("random init", pooling)] = random_pooled[pooling]
        results[task] = {name: probe(vectors, labels, splits) for name, vectors in embeddings.items()}
    record["results"] = results
    if args.online_probe != "none":
        config = pretrain_job(args, record.get("max_steps", args.probe_step or 1))
        online = report_online(args, config, record)
        (args.out / "online.md").write_text(online + "\n")
        print("\nonline probes during pretraining (%) against the offline linear probe of the same checkpoints")
        print(online)
    (args.out / "run.json").write_text(json.dumps(record, indent=2))
    print("\ntest accuracy (%) of linear probes on frozen embeddings; chance = the test split's largest class")
    print(write_table(args.out, results, chance))
    return 0


if __name__ == "__main__":
    sys.exit(main())
