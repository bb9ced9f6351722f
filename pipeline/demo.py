"""`make demo`: the whole pipeline on one machine, on generated audio, in a few minutes on the CPU.

1. writes a small audio set (harmonic tones with vibrato and noise bursts, WAV and FLAC) to
   ``outputs/demo/audio``;
2. featurizes it with Ray Data (``configs/featurize/local.yaml``);
3. pretrains the ``local-tiny`` preset on Ray Train, tracked in a local MLflow store;
4. copies the final encoder to ``outputs/demo/ssamba_encoder.pt`` (what ``configs/embed/local.yaml`` and
   ``configs/tune/local-finetune.yaml`` start from) and prints where the checkpoints are and how to
   look at the run in MLflow.

It needs no data, no network and no GPU. Each call starts a new, timestamped run, so runs can be
compared side by side in MLflow.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
from pathlib import Path

import numpy as np
import soundfile
from mlflow.tracking import MlflowClient

from pipeline import featurize, pretrain
from pipeline.config import FeaturizeConfig, PretrainJobConfig, load_config
from pipeline.data.paths import absolute
from pipeline.data.storage import resolve
from pipeline.runtime.launch import mlflow_ui_hint
from pipeline.runtime.tracking import resolve_tracking_uri

SAMPLE_RATE = 16_000
FEATURIZE_PRESET = Path("configs/featurize/local.yaml")
PRETRAIN_PRESET = Path("configs/pretrain/local-tiny.yaml")
LATEST_ENCODER = Path("outputs/demo/ssamba_encoder.pt")  # the newest demo encoder, at a fixed path


def synthetic_clip(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """A harmonic tone with vibrato and an onset, plus a short burst of noise."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    pitch = rng.uniform(100, 800)
    vibrato = 1 + 0.02 * np.sin(2 * np.pi * rng.uniform(2, 6) * t)
    phase = 2 * np.pi * np.cumsum(pitch * vibrato) / SAMPLE_RATE
    harmonics = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = 1 / (1 + np.exp(-20 * (t - rng.uniform(0, seconds / 2))))
    burst_start = rng.uniform(0, seconds)
    burst = ((t > burst_start) & (t < burst_start + 0.2)) * rng.standard_normal(len(t))
    return (0.3 * harmonics * envelope + 0.1 * burst).astype(np.float32)


def write_audio(folder: Path, clips: int, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(clips):
        path = folder / f"clip{index:03d}.{'flac' if index % 4 == 0 else 'wav'}"
        if not path.exists():
            soundfile.write(path, synthetic_clip(rng, 3.0), SAMPLE_RATE)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--steps", type=int, default=None, help="override the preset's max_steps")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    featurize_config = load_config(FeaturizeConfig, FEATURIZE_PRESET)
    write_audio(Path(featurize_config.input.uri), args.clips)
    print(featurize.run(featurize_config).table())

    overrides = [f"name=local-tiny-{dt.datetime.now():%Y%m%d-%H%M%S}"]
    if args.steps is not None:
        overrides.append(f"train.max_steps={args.steps}")
    config = load_config(PretrainJobConfig, PRETRAIN_PRESET, overrides)
    result = pretrain.run(config)

    tracking_uri = resolve_tracking_uri(config.tracking.tracking_uri)
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    (run,) = client.search_runs([experiment.experiment_id], f"tags.ray_run_name = '{config.name}'")
    losses = client.get_metric_history(run.info.run_id, "loss")
    print(f"\npretrained {config.name} for {result.metrics['step']} steps: "
          f"loss {losses[0].value:.3f} (step {losses[0].step}) → {losses[-1].value:.3f} (step {losses[-1].step}), "
          f"validation masked-patch accuracy {result.metrics.get('val_masked_accuracy', float('nan')):.3f}")
    encoder = resolve(pretrain.encoder_uri(config))
    latest = absolute(LATEST_ENCODER)
    latest.write_bytes(encoder.read_bytes())
    print(f"  checkpoints: {resolve(config.storage_path).join(config.name)}")
    print(f"  encoder:     {encoder} (model.checkpoint of a fine-tuning job), copied to {latest}")
    print(f"  {mlflow_ui_hint(tracking_uri, config.tracking.experiment)}")


if __name__ == "__main__":
    main()
