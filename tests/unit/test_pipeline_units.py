"""Pure parts of the Ray layer: configs, URIs, sources, decoding. No services needed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from support.audio_files import BAD, GOOD, write_collection
from pipeline import featurize
from pipeline.data.audio import AudioError, decode_audio, split_long_audio
from pipeline.config import (
    ConfigError, EmbedConfig, FeaturizeConfig, FinetuneJobConfig, InputConfig, PretrainJobConfig, S3Config, flatten, load_config, public_dict,
)
from pipeline.data.shards import deal_shards
from pipeline.data.sources import AudioSource, SourceError, list_sources
from pipeline.data.storage import DEFAULT_REGION, resolve, s3_region
from pipeline.config.sweep import TuneJobConfig


def test_invalid_config_names_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("input: {uri: /data}\noutput: /out\nshard_size: 0\naudio: {long_audio: slice}\n")
    with pytest.raises(ConfigError) as error:
        load_config(FeaturizeConfig, path)
    message = str(error.value)
    assert "shard_size" in message and "audio.long_audio" in message
    with pytest.raises(ConfigError, match="input"):
        load_config(FeaturizeConfig, None, ["output=/out"])
    with pytest.raises(ConfigError, match="exactly one of input.uri"):
        load_config(FeaturizeConfig, None, ["output=/out", "input.uri=/a", "input.manifest=/b.csv"])
    with pytest.raises(ConfigError, match="shard_sise"):
        load_config(FeaturizeConfig, None, ["output=/out", "input.uri=/a", "shard_sise=3"])  # typo


def test_overrides_parse_yaml_values_and_secrets_stay_hidden():
    config = load_config(FeaturizeConfig, None, [
        "input.uri=s3://b/p", "output=s3://b/out", "shard_size=12", "audio.max_seconds=2.5",
        "storage.access_key_id=AKIA-TEST", "storage.secret_access_key=very-secret",
    ])
    assert config.shard_size == 12 and config.audio.max_seconds == 2.5
    for text in (repr(config), json.dumps(public_dict(config)), json.dumps(flatten(public_dict(config)))):
        assert "very-secret" not in text and "AKIA-TEST" not in text
    assert flatten({"a": {"b": 1, "c": {"d": 2}}}) == {"a.b": 1, "a.c.d": 2}
    with pytest.raises(ConfigError, match="key=value"):
        load_config(FeaturizeConfig, None, ["shard_size"])
    with pytest.raises(ConfigError, match="together"):
        load_config(FeaturizeConfig, None, ["input.uri=/a", "output=/b", "storage.access_key_id=x"])


def test_local_paths_are_made_absolute_where_the_config_is_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Ray workers and Tune trials run elsewhere: relative paths must not reach them
    config = load_config(FinetuneJobConfig, None, [
        "name=n", "task=esc50", "storage_path=runs", "data_root=~/esc50", "features=s3://bucket/features"])
    assert config.storage_path == (tmp_path / "runs").as_posix() and config.model.checkpoint == ""
    assert config.data_root.startswith("/") and config.data_root.endswith("/esc50") and "~" not in config.data_root
    assert config.features == "s3://bucket/features"


def test_resolve_uris(tmp_path):
    local = resolve(str(tmp_path))
    assert local.path == tmp_path.as_posix() and not local.is_s3
    assert resolve(f"file://{tmp_path}").path == tmp_path.as_posix()
    s3 = resolve("s3://bucket/some/prefix/", S3Config(endpoint_url="http://127.0.0.1:9000", region="eu-west-1"))
    assert s3.is_s3 and s3.path == "bucket/some/prefix" and s3.join("x.parquet").uri == "s3://bucket/some/prefix/x.parquet"
    assert str(s3) == "s3://bucket/some/prefix (endpoint http://127.0.0.1:9000)"
    for bad in ("gs://bucket/x", "s3://", "s3://bucket/x?endpoint_override=h"):
        with pytest.raises(ValueError):
            resolve(bad)


def test_s3_region_is_left_to_aws_unless_configured():
    looked_up = []

    def lookup(bucket):  # stands for the bucket-region request: no network here
        looked_up.append(bucket)
        return {"eu-bucket": "eu-west-1"}.get(bucket)

    aws = S3Config()
    assert s3_region(S3Config(region="ap-south-1"), "eu-bucket", {"AWS_REGION": "us-west-2"}, lookup) == "ap-south-1"
    assert s3_region(aws, "eu-bucket", {"AWS_REGION": "us-west-2"}, lookup) == "us-west-2"
    assert s3_region(aws, "eu-bucket", {"AWS_DEFAULT_REGION": "us-west-1"}, lookup) == "us-west-1"
    assert not looked_up  # a configured region is never second-guessed
    assert s3_region(aws, "eu-bucket", {}, lookup) == "eu-west-1"  # the bucket's own region, not us-east-1
    assert s3_region(aws, "private-bucket", {}, lookup) is None  # unknown: the AWS SDK decides (profile, metadata)
    assert s3_region(aws, None, {}, lookup) is None
    assert looked_up == ["eu-bucket", "private-bucket"]
    custom = S3Config(endpoint_url="http://127.0.0.1:9000")
    assert s3_region(custom, "b", {}, lookup) == DEFAULT_REGION  # S3-compatible stores keep the default
    assert s3_region(aws, "b", {"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9000"}, lookup) == DEFAULT_REGION
    assert s3_region(custom, "b", {"AWS_REGION": "eu-central-1"}, lookup) == "eu-central-1"
    assert looked_up == ["eu-bucket", "private-bucket"]


def test_list_prefix_and_manifest(tmp_path):
    root = write_collection(tmp_path / "audio")
    sources = list_sources(InputConfig(uri=str(root)), S3Config())
    assert [s.uri for s in sources] == sorted(str(root / name) for name in [*GOOD, *BAD])  # README.txt skipped
    (root / "m.jsonl").write_text('{"uri": "good/tone_16k_mono.wav", "label": "a", "fold": 3}\n\n'
                                  f'{{"uri": "{root / "bad/empty.wav"}"}}\n')
    sources = list_sources(InputConfig(manifest=str(root / "m.jsonl")), S3Config())
    assert [(s.uri, s.label, s.fold) for s in sources] == [
        (str(root / "bad/empty.wav"), None, None), (str(root / "good/tone_16k_mono.wav"), "a", 3)]
    (root / "broken.csv").write_text("path,label\nx.wav,a\n")
    with pytest.raises(SourceError, match="needs a 'uri'"):
        list_sources(InputConfig(manifest=str(root / "broken.csv")), S3Config())
    (root / "dup.csv").write_text("uri\na.wav\na.wav\n")
    with pytest.raises(SourceError, match="more than once"):
        list_sources(InputConfig(manifest=str(root / "dup.csv")), S3Config())
    with pytest.raises(SourceError, match="does not exist"):
        list_sources(InputConfig(uri=str(root / "missing")), S3Config())


def test_multi_label_manifest_rows_round_trip(tmp_path):
    source = AudioSource("/a.wav", split="train", labels=("/m/x", "/m/y"))
    (tmp_path / "m.jsonl").write_text(json.dumps(source.to_dict()) + "\n")
    (tmp_path / "m.csv").write_text('uri,split,labels\n/a.wav,train,"/m/x,/m/y"\n')
    for manifest in ("m.jsonl", "m.csv"):
        assert list_sources(InputConfig(manifest=str(tmp_path / manifest)), S3Config()) == [source]
    assert AudioSource.from_dict(json.loads(json.dumps(source.to_dict()))) == source
    assert AudioSource("/b.wav", "dog").to_dict() == {"uri": "/b.wav", "label": "dog", "split": None, "fold": None}
    assert AudioSource("/b.wav", "dog").targets == ("dog",)
    (tmp_path / "bad.jsonl").write_text('{"uri": "/a.wav", "labels": [1, 2]}\n')
    with pytest.raises(SourceError, match="labels must be a list of class names"):
        list_sources(InputConfig(manifest=str(tmp_path / "bad.jsonl")), S3Config())


def test_decode_classifies_every_bad_file(tmp_path):
    root = write_collection(tmp_path)
    for name, reason in BAD.items():
        with pytest.raises(AudioError) as error:
            decode_audio((root / name).read_bytes(), name)
        assert error.value.reason == reason, name
    decoded = decode_audio((root / "good/tone_44k_stereo.flac").read_bytes(), "x.flac")
    assert decoded.sample_rate == 16_000 and decoded.source_sample_rate == 44_100 and decoded.source_channels == 2
    assert decoded.waveform.dtype == np.float32 and decoded.duration_s == pytest.approx(0.8, abs=1e-3)


def test_split_long_audio():
    wave = np.arange(35, dtype=np.float32)
    assert [o for o, _ in split_long_audio(wave, 10, 1.0, "chunk", 0.3)] == [0.0, 1.0, 2.0, 3.0]  # 0.5 s tail kept
    assert [len(p) for _, p in split_long_audio(wave, 10, 1.0, "chunk", 0.6)] == [10, 10, 10]  # tail dropped
    assert [len(p) for _, p in split_long_audio(wave, 10, 1.0, "crop", 0.3)] == [10]
    assert len(split_long_audio(wave, 10, None, "crop", 0.3)[0][1]) == 35


@pytest.mark.parametrize("folder,model", [("featurize", FeaturizeConfig), ("pretrain", PretrainJobConfig),
                                          ("embed", EmbedConfig), ("finetune", FinetuneJobConfig),
                                          ("tune", TuneJobConfig)])
def test_shipped_presets_validate(folder, model):
    from pathlib import Path

    presets = sorted(Path(__file__).resolve().parents[2].joinpath("configs", folder).glob("*.yaml"))
    assert presets
    for preset in presets:
        load_config(model, preset)


def test_paper_recipe_preset():
    config = load_config(PretrainJobConfig, "configs/pretrain/base.yaml")
    assert config.train.global_batch_size == 64 and config.optim.lr == 1e-4 and config.optim.weight_decay == 5e-8
    assert config.optim.betas == (0.95, 0.999) and config.optim.warmup_steps == 1000 and config.masking.mask_patches == 400
    with pytest.raises(ConfigError, match="exactly one of mask_patches and mask_ratio"):
        load_config(PretrainJobConfig, "configs/pretrain/base.yaml", ["masking.mask_ratio=0.5", "masking.mask_patches=300"])
    ratio = load_config(PretrainJobConfig, "configs/pretrain/base.yaml", ["masking={mask_ratio: 0.6}"])
    assert ratio.masking.mask_patches is None and ratio.masking.mask_ratio == 0.6


def test_elastic_scaling_and_a_global_batch_that_holds_on_every_world_size():
    from pipeline.pretrain import accumulation_steps

    preset = "configs/pretrain/local-tiny.yaml"  # batch_size 8
    config = load_config(PretrainJobConfig, preset, ["scaling.num_workers=[1, 4]", "scaling.resize_interval_s=5",
                                                     "train.global_batch_size=96"])
    assert config.scaling.elastic and config.scaling.worker_range == (1, 4)
    assert config.scaling.ray_scaling() == {"num_workers": (1, 4), "use_gpu": False, "resources_per_worker": {"CPU": 1},
                                            "elastic_resize_monitor_interval_s": 5.0}
    assert [accumulation_steps(config, size) for size in (1, 2, 3, 4)] == [12, 6, 4, 3]
    derived = load_config(PretrainJobConfig, preset, ["scaling.num_workers=[1, 2]", "train.grad_accum=2"])
    assert derived.train.global_batch_size == 32 and "global_batch_size" not in derived.train.model_fields_set
    assert [accumulation_steps(derived, size) for size in (1, 2)] == [4, 2]
    fixed = load_config(PretrainJobConfig, preset, ["scaling.num_workers=2", "train.grad_accum=3"])
    assert fixed.scaling.ray_scaling()["num_workers"] == 2 and fixed.train.global_batch_size == 48
    assert accumulation_steps(fixed, 2) == 3
    local = load_config(PretrainJobConfig, preset, ["scaling.num_workers=0", "train.global_batch_size=16"])
    assert accumulation_steps(local, 1) == 2
    for bad, field in ((["scaling.num_workers=[2, 1]"], "1 <= min <= max"), (["scaling.num_workers=[0, 2]"], "1 <= min"),
                       (["scaling.num_workers=[2, 3]"], r"train.global_batch_size: 24 \(batch_size x most workers x "
                        r"grad_accum\) is not a whole number of micro-batches of train.batch_size 8 on 2 workers .* "
                        r"multiple of 48"),
                       (["train.global_batch_size=16", "train.grad_accum=3"], "disagree"),
                       (["scaling.num_workers=[1, 2, 3]"], "scaling.num_workers")):
        with pytest.raises(ConfigError, match=field):
            load_config(PretrainJobConfig, preset, bad)
    with pytest.raises(ConfigError, match="scaling.num_workers"):  # fine-tuning keeps a fixed number
        load_config(FinetuneJobConfig, "configs/finetune/esc50.yaml", ["scaling.num_workers=[1, 2]"])


def test_learning_rate_warmup_plateau_and_cosine():
    from pipeline.pretrain import LearningRate

    config = load_config(PretrainJobConfig, "configs/pretrain/local-tiny.yaml",
                         ["optim.schedule=plateau", "optim.warmup_steps=10", "optim.lr=1.0", "optim.plateau_patience=1"])
    schedule = LearningRate(config)
    assert [schedule.factor(step) for step in (1, 5, 10, 50)] == pytest.approx([0.1, 0.5, 1.0, 1.0])
    for accuracy in (0.5, 0.4, 0.45):  # best, then two evaluations without improvement > patience 1
        schedule.observe(accuracy)
    assert schedule.factor(50) == pytest.approx(0.5)
    restored = LearningRate(config)
    restored.load_state_dict(schedule.state_dict())
    assert restored.factor(50) == pytest.approx(0.5)
    cosine = LearningRate(config.model_copy(update={"optim": config.optim.model_copy(update={"schedule": "cosine"})}))
    assert cosine.factor(10) == pytest.approx(1.0) and cosine.factor(config.train.max_steps) == pytest.approx(0.0, abs=1e-12)


def test_featurize_cli_rejects_invalid_config_before_any_work(capsys):
    assert featurize.main(["--set", "input.uri=/nowhere", "--set", "output=/out", "--set", "num_workers=-1"]) == 2
    assert "num_workers" in capsys.readouterr().err


def test_shards_are_dealt_in_a_seeded_random_order_keeping_member_runs_together():
    files = [AudioSource(f"/data/class{label}/clip{index:02d}.wav", f"class{label}") for label in range(4) for index in range(32)]
    table = [AudioSource(f"s3://b/t.parquet#{row}") for row in range(100)]
    shards = deal_shards(list(reversed(files)) + table, shard_size=32)
    assert shards == deal_shards(files + table, shard_size=32)  # the same input, the same shards
    assert sorted(source for shard in shards.values() for source in shard) == sorted(files + table)
    assert list(shards) == list(range(8)) and all(len(shard) == 32 for shard in list(shards.values())[:-1])
    for shard in deal_shards(files, shard_size=32).values():  # no shard is one class folder
        labels = [source.label for source in shard]
        assert max(labels.count(label) for label in set(labels)) <= 0.5 * len(labels)
    order = [int(source.uri.split("#")[1]) for shard in shards.values() for source in shard if "#" in source.uri]
    positions = {row: index for index, row in enumerate(order)}
    assert [positions[row + 1] - positions[row] for row in range(63)] == [1] * 63  # rows 0-63: one run
    assert deal_shards(files, 32, first_shard=5).keys() == {5, 6, 7, 8}


def test_the_storage_layer_needs_neither_torch_nor_the_job_configs():
    import subprocess
    import sys

    probe = "import sys, pipeline.data.storage; print(sorted(m for m in ('torch', 'ssamba', 'pipeline.config') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


def test_stored_fbank_round_trip_keeps_float16_precision():
    from pipeline.data.feature_store import STORED_PRECISION, decode_fbank, encode_fbank

    reference = torch.linspace(-15.0, 25.0, 7 * 128, dtype=torch.float64).reshape(7, 128)
    stored = encode_fbank(reference.float())
    assert (stored["n_frames"], stored["n_mels"], len(stored["fbank"])) == (7, 128, 7 * 128 * 2)
    restored = decode_fbank(stored["fbank"], stored["n_frames"], stored["n_mels"])
    assert restored.dtype == torch.float32 and STORED_PRECISION == "float16"
    assert (restored.double() - reference).abs().max() <= 25.0 * 2**-11  # half an ulp of float16 at 25


def test_a_model_card_renders_every_fact_and_round_trips_as_json():
    from pipeline.models.model_card import ModelCard

    card = ModelCard(kind="classifier", run="esc-fold1", run_id="abc123", architecture={"embed_dim": 64},
                     parameters=12345, objective={"task": "esc50"}, data={"features": "s3://f", "rows": 10},
                     training={"epochs": 2}, selected_by={"val_accuracy": 0.5}, fbank={"num_mel_bins": 128},
                     labels=["dog", "rain"], commit="deadbeef")
    page = card.markdown()
    for fact in ("# SSAMBA classifier: esc-fold1", "`abc123`", "`deadbeef`", "| embed_dim | 64 |", "12,345",
                 "| task | esc50 |", "| rows | 10 |", "| val_accuracy | 0.5 |", "| num_mel_bins | 128 |", "dog, rain"):
        assert fact in page, fact
    assert json.loads(card.to_json())["selected_by"] == {"val_accuracy": 0.5}
