"""Checkpoints in the official SSAMBA layout, made from our models (what the official code saves)."""

from __future__ import annotations

import torch

from ssamba import SSAMBAPretrainModel


def official_layout(model: SSAMBAPretrainModel) -> dict[str, torch.Tensor]:
    """Rename our weights to the official DataParallel layout and add the keys SSAMBA never uses."""
    state = {}
    for key, value in model.state_dict().items():
        name = "v." + key.removeprefix("encoder.") if key.startswith("encoder.") else key
        state["module." + name] = value.clone()
    dim = model.encoder.embed_dim
    state["module.v.head.weight"] = torch.randn(1000, dim)
    state["module.v.head.bias"] = torch.randn(1000)
    state["module.p_input_fdim"] = torch.tensor(model.grid.num_mel_bins)
    state["module.p_input_tdim"] = torch.tensor(model.grid.target_length)
    return state
