"""``from_pretrained``: a ready SSAMBA encoder from a file or the name of an official checkpoint.

Official checkpoints are looked up by name in a local cache folder (``$SSAMBA_HOME``, else
``~/.cache/ssamba``) and never downloaded: this package makes no network access, so a missing file
is an error that says where to put it. URIs (``s3://``, ``models:/``...) are the pipeline's business
(``pipeline.models.loaders.from_pretrained``), since this package never imports boto3, MLflow or Ray.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ssamba.checkpoint import Source, load_encoder_weights
from ssamba.encoder import SSAMBAEncoder

# The released SSAMBA pretraining checkpoints (docs/model.md#official-checkpoints): size × masked patches.
PRESETS: dict[str, str] = {
    f"ssamba-{size}-{masks}": f"ssamba_{size}_{masks}.pth" for size in ("tiny", "small", "base") for masks in (250, 300, 400)
}
RELEASE = "Hugging Face attentionisallyouneed369/ssamba, or the links in github.com/SiavashShams/ssamba's README"
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")  # a scheme of two letters or more: not a Windows drive


def cache_dir() -> Path:
    """Where preset checkpoints are looked up: ``$SSAMBA_HOME``, else ``~/.cache/ssamba``."""
    return Path(os.environ.get("SSAMBA_HOME") or Path.home() / ".cache" / "ssamba").expanduser()


def is_uri(name: str) -> bool:
    """Whether ``name`` has a URI scheme (``s3://``, ``models:/``, ``file://``...) rather than being a
    local path or a preset name."""
    return bool(_URI.match(name))


def from_pretrained(name_or_path: Source) -> SSAMBAEncoder:
    """An SSAMBA encoder with its weights, in eval mode, from a local path, ``file://`` URI, file object
    or bytes holding one of our checkpoints, an exported ``ssamba_encoder.pt``, a fine-tuning job's
    ``classifier.pt`` (its fine-tuned encoder) or an official SSAMBA ``.pth``; or from the name of an official checkpoint (:data:`PRESETS`) in :func:`cache_dir`."""
    config, state = load_encoder_weights(_resolve(name_or_path))
    encoder = SSAMBAEncoder(config)
    encoder.load_state_dict(state)
    return encoder.eval()


def _resolve(name_or_path: Source) -> Source:
    """A preset name → its file in the cache; URIs other than ``file://`` are refused with a pointer."""
    if not isinstance(name_or_path, str):
        return name_or_path
    if name_or_path in PRESETS:
        path = cache_dir() / PRESETS[name_or_path]
        if not path.is_file():
            raise FileNotFoundError(
                f"{name_or_path!r} is not in the local cache: download {PRESETS[name_or_path]} from the official "
                f"release ({RELEASE}) and put it at {path} (set SSAMBA_HOME to use another folder); ssamba never "
                "downloads, since fetching from the hub needs network access")
        return str(path)
    if is_uri(name_or_path) and not name_or_path.startswith("file://"):
        raise ValueError(f"{name_or_path!r}: ssamba reads local files and preset names only; for URIs use "
                         "pipeline.models.loaders.from_pretrained, which reads them and returns the same encoder")
    if not os.path.exists(name_or_path.removeprefix("file://")):
        raise FileNotFoundError(f"{name_or_path!r} is neither a file nor a preset name ({', '.join(PRESETS)})")
    return name_or_path
