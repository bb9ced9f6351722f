"""The SSAMBA encoder: patch embedding, [CLS] + positional embedding, Mamba blocks, final norm.

The default reproduces the official topology exactly (docs/model.md#topology), quirks included, so that official
checkpoints load and give the same outputs:

* 24 blocks used as 12 *flip-pairs*: block 2i reads the sequence, block 2i+1 reads it reversed, and
  both their hidden states and their residual streams are summed (the residual doubles per pair);
* a final residual add with drop-path 0.1, then the final norm applied twice.

``topology="sequential"`` is the plain 24-block stack, an option, never the default.

On CUDA the flip-pairs run a lean form of the same computation (:mod:`ssamba.fastpath`): a flip-pair's
backward block normalises per token and its mixer can read the sequence reversed by itself
(``BiMambaMixer.forward_lean(reverse=True)``), so neither stream is ever flipped; outside training
both blocks see the same residual stream, so one fused pass adds it and applies both norms, and the
pair's residual sum is that stream doubled.
Token order is frequency-major: all time steps of the lowest 16-bin band first, then the next band.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Literal, get_args

import torch
from torch import nn

from ssamba import fastpath
from ssamba.mixer import BiMambaMixer, init_mixer_weights

# The named model sizes (width; depth 24 for all), the norms and the block topologies: the one list
# of each, read by job configs too.
EMBED_DIMS: dict[str, int] = {"tiny": 192, "small": 384, "base": 768}
Norm = Literal["layernorm", "rmsnorm"]
Topology = Literal["flip_pairs", "sequential"]
NORMS: tuple[str, ...] = get_args(Norm)
TOPOLOGIES: tuple[str, ...] = get_args(Topology)
# Called with each stage's output (see SSAMBAEncoder.stage_outputs); None on the ordinary forward.
StageHook = Callable[[torch.Tensor], None] | None


@dataclass(frozen=True)
class PatchGrid:
    """How a ``(frames, mel)`` spectrogram becomes tokens: kernel and stride per axis.

    16×16 patches with stride 16 in pretraining (8×64 = 512 tokens for 1024 frames), stride 10 in
    fine-tuning; ``fshape=128, tshape=2`` gives SSAST-style frame tokens."""

    num_mel_bins: int = 128
    target_length: int = 1024
    fshape: int = 16
    tshape: int = 16
    fstride: int = 16
    tstride: int = 16

    def __post_init__(self) -> None:
        if self.fshape > self.num_mel_bins or self.tshape > self.target_length:
            raise ValueError(f"patch {self.fshape}×{self.tshape} larger than the input {self}")
        if min(self.fshape, self.tshape, self.fstride, self.tstride) < 1:
            raise ValueError(f"patch shapes and strides must be positive: {self}")

    @property
    def freq_patches(self) -> int:
        return (self.num_mel_bins - self.fshape) // self.fstride + 1

    @property
    def time_patches(self) -> int:
        return (self.target_length - self.tshape) // self.tstride + 1

    @property
    def num_patches(self) -> int:
        return self.freq_patches * self.time_patches

    @property
    def patch_size(self) -> int:
        return self.fshape * self.tshape

    @property
    def overlapping(self) -> bool:
        return self.fstride < self.fshape or self.tstride < self.tshape


@dataclass(frozen=True)
class EncoderConfig:
    """Everything that fixes the encoder's parameters and computation; stored in checkpoints."""

    embed_dim: int = 768
    depth: int = 24
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    grid: PatchGrid = PatchGrid()
    drop_path_rate: float = 0.1
    norm: Norm = "layernorm"
    norm_eps: float = 1e-5
    topology: Topology = "flip_pairs"
    divide_out: bool = True

    def __post_init__(self) -> None:
        if self.topology == "flip_pairs" and self.depth % 2:
            raise ValueError(f"flip_pairs topology needs an even depth, got {self.depth}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.topology not in TOPOLOGIES:
            raise ValueError(f"topology must be one of {', '.join(TOPOLOGIES)}, got {self.topology!r}")

    @classmethod
    def from_size(cls, size: str, **overrides) -> EncoderConfig:
        """``tiny`` / ``small`` / ``base`` (D = 192 / 384 / 768), depth 24 for all three; ``overrides``
        replace any field, the width included (a narrower model for small experiments)."""
        if size not in EMBED_DIMS:
            raise ValueError(f"unknown model size {size!r}; choose from {sorted(EMBED_DIMS)}")
        return cls(**{"embed_dim": EMBED_DIMS[size], **overrides})

    def with_grid(self, grid: PatchGrid) -> EncoderConfig:
        return replace(self, grid=grid)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EncoderConfig:
        data = dict(data)
        data["grid"] = PatchGrid(**data.get("grid", {}))
        return cls(**data)


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample: zero a sample's branch with probability ``rate``, rescale the rest."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


def make_norm(config: EncoderConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.embed_dim, eps=config.norm_eps)
    return nn.LayerNorm(config.embed_dim, eps=config.norm_eps)


class Block(nn.Module):
    """Vim's block, non-fused path: add the residual, normalise, mix ("Add → Norm → Mixer")."""

    def __init__(self, config: EncoderConfig, drop_path_rate: float) -> None:
        super().__init__()
        self.norm = make_norm(config)
        self.mixer = BiMambaMixer(
            config.embed_dim, config.d_state, config.d_conv, config.expand, divide_out=config.divide_out
        )
        self.drop_path_rate = drop_path_rate

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
        else:
            residual = residual + drop_path(hidden, self.drop_path_rate, self.training)
        return self.mixer(self.norm(residual)), residual


class PatchEmbed(nn.Module):
    """``(batch, frames, mel)`` → ``(batch, tokens, D)`` with a strided Conv2d, frequency-major order."""

    def __init__(self, grid: PatchGrid, embed_dim: int) -> None:
        super().__init__()
        self.grid = grid
        self.proj = nn.Conv2d(
            1, embed_dim, kernel_size=(grid.fshape, grid.tshape), stride=(grid.fstride, grid.tstride)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        image = features.unsqueeze(1).transpose(2, 3)  # (batch, 1, mel, frames): frequency = height
        return self.proj(image).flatten(2).transpose(1, 2)


class SSAMBAEncoder(nn.Module):
    """The SSAMBA encoder. ``forward`` returns all tokens, [CLS] at position 0, after the final norm.

    Pretraining and fine-tuning models use the two halves separately: :meth:`embed_patches` (so
    masked tokens can be replaced) and :meth:`forward_tokens` (the rest). ``forward_tokens`` is in turn
    :meth:`add_positions` then :meth:`encode_sequence`, so that a student can encode only a subset of
    the positioned tokens (a shorter sequence), and :meth:`stage_outputs` gives a teacher the block
    stack's intermediate outputs."""

    num_prefix_tokens = 1

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.patch_embed = PatchEmbed(config.grid, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.grid.num_patches + 1, dim))
        self.layers = nn.ModuleList(
            Block(config, rate) for rate in self.drop_path_schedule(config.depth, config.drop_path_rate)
        )
        self.norm_f = make_norm(config)
        self._init_weights()

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def num_stages(self) -> int:
        """Sequential stages of the block stack: the two blocks of a flip-pair read the same stream side
        by side, so a pair is one stage; a sequential block is one stage."""
        return self.config.depth // 2 if self.config.topology == "flip_pairs" else self.config.depth

    @staticmethod
    def drop_path_schedule(depth: int, rate: float) -> list[float]:
        """Vim's per-block rates: ``[0] + linspace(0, rate, depth)``, truncated to ``depth``."""
        return [0.0] + torch.linspace(0, rate, depth).tolist()[: depth - 1]

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.layers.apply(partial(init_mixer_weights, n_layer=self.config.depth))

    def embed_patches(self, features: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(features)

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Patch tokens ``(batch, N, D)`` → encoded ``(batch, N + 1, D)`` with [CLS] at 0."""
        return self.encode_sequence(self.add_positions(tokens))

    def add_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """Patch tokens ``(batch, N, D)`` → ``(batch, N + 1, D)``: [CLS] prepended, positional embedding
        added. Each token carries its position from here on, so any subset gathered from this output
        is a valid (shorter) input to :meth:`encode_sequence`."""
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1) + self.pos_embed

    def encode_sequence(self, hidden: torch.Tensor) -> torch.Tensor:
        """Positioned tokens ``(batch, L, D)``, of any length L, → the block stack and the final norm."""
        hidden, residual = self._run_blocks(hidden)
        if fastpath.use_lean_forward(hidden):
            normed, _ = fastpath.add_norm(drop_path(hidden, self.config.drop_path_rate, self.training), residual, self.norm_f)
            return fastpath.add_norm(normed, None, self.norm_f)[0]  # the official code normalises twice
        residual = residual + drop_path(hidden, self.config.drop_path_rate, self.training)
        return self.norm_f(self.norm_f(residual))  # the official code normalises twice (docs/model.md#final-norm-twice)

    def stage_outputs(self, hidden: torch.Tensor, last: int) -> list[torch.Tensor]:
        """The outputs of the last ``last`` stages (:attr:`num_stages`) for positioned tokens ``(batch, L, D)``,
        each ``(batch, L, D)``, oldest first; no final norm.

        A stage's output is its mixers' output before the residual add (a flip-pair's two mixer
        outputs summed): the analogue of the transformer block's feed-forward output that data2vec
        and EAT take as teacher targets. The residual stream itself would be dominated by the input
        embedding, which the flip-pairs double at every stage (docs/model.md#topology)."""
        outputs: deque[torch.Tensor] = deque(maxlen=last)
        self._run_blocks(hidden, outputs.append)
        return list(outputs)

    def _run_blocks(self, hidden: torch.Tensor, on_stage: StageHook = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The block stack in the configured topology: the last stage's output and the residual stream."""
        if self.config.topology == "flip_pairs" and fastpath.use_lean_forward(hidden):
            return self._run_flip_pairs_lean(hidden, on_stage)
        if self.config.topology == "flip_pairs":
            return self._run_flip_pairs(hidden, on_stage)
        return self._run_sequential(hidden, on_stage)

    def _run_flip_pairs(self, hidden: torch.Tensor, on_stage: StageHook = None) -> tuple[torch.Tensor, torch.Tensor]:
        residual = None
        for forward_block, backward_block in zip(self.layers[0::2], self.layers[1::2]):
            hidden_f, residual_f = forward_block(hidden, residual)
            hidden_b, residual_b = backward_block(hidden.flip(1), None if residual is None else residual.flip(1))
            hidden, residual = hidden_f + hidden_b.flip(1), residual_f + residual_b.flip(1)
            if on_stage is not None:
                on_stage(hidden)
        return hidden, residual

    def _run_flip_pairs_lean(self, hidden: torch.Tensor, on_stage: StageHook = None) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_run_flip_pairs` without flips. Per pair, with ``s = residual + hidden``: the reference's
        ``residual_f + residual_b.flip(1)`` is ``s + s`` outside training (drop-path draws one mask
        per sample and block, so in training the two sums differ) and ``hidden_b.flip(1)`` is the
        backward block's mixer run reversed on ``norm_b(s)``."""
        residual = None
        inference = not torch.is_grad_enabled()
        for forward_block, backward_block in zip(self.layers[0::2], self.layers[1::2]):
            stochastic = self.training and (forward_block.drop_path_rate > 0 or backward_block.drop_path_rate > 0)
            if residual is None or not stochastic:
                normed_f, normed_b, summed = fastpath.add_norm_pair(hidden, residual, forward_block.norm, backward_block.norm)
                residual = summed.add_(summed) if inference and residual is not None else summed + summed
                del summed
            else:
                normed_f, summed_f = fastpath.add_norm(
                    drop_path(hidden, forward_block.drop_path_rate, True), residual, forward_block.norm)
                normed_b, summed_b = fastpath.add_norm(
                    drop_path(hidden, backward_block.drop_path_rate, True), residual, backward_block.norm)
                residual = summed_f + summed_b
            del hidden
            hidden = forward_block.mixer.forward_lean(normed_f)
            del normed_f
            hidden_b = backward_block.mixer.forward_lean(normed_b, reverse=True)
            del normed_b
            hidden = hidden.add_(hidden_b) if inference else hidden + hidden_b
            del hidden_b
            if on_stage is not None:  # nothing writes into this stage's output later: the next adds make new tensors
                on_stage(hidden)
        return hidden, residual

    def _run_sequential(self, hidden: torch.Tensor, on_stage: StageHook = None) -> tuple[torch.Tensor, torch.Tensor]:
        residual = None
        for block in self.layers:
            hidden, residual = block(hidden, residual)
            if on_stage is not None:
                on_stage(hidden)
        return hidden, residual

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(batch, frames, mel)`` normalised fbank → ``(batch, N + 1, D)``."""
        return self.forward_tokens(self.embed_patches(features))
