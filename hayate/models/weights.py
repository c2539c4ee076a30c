"""Copying named checkpoint weights into a built model, swapping in packed linears."""
from __future__ import annotations

from typing import Iterable, Union

import torch
from torch import nn

from hayate.layers.embedding import PackedEmbedding
from hayate.layers.linear import PackedLinear
from hayate.layers.quant import PackedWeight

WeightValue = Union[torch.Tensor, PackedWeight]


def embedding(num_embeddings: int, dim: int) -> nn.Embedding:
    """An nn.Embedding left uninitialised: its values come from the checkpoint. (Its random
    normal_ initialisation, on the meta device models are built on, would import TorchDynamo:
    1.4 s of a load.)"""
    return nn.Embedding(num_embeddings, dim, _weight=torch.empty(num_embeddings, dim))


def load_named_weights(model: nn.Module, weights: Iterable[tuple[str, WeightValue]],
                       skip: tuple[str, ...] = ()) -> None:
    """Assign every (Hugging Face name, value); raise ValueError on unknown names, shape
    mismatches, or parameters the checkpoint never provided."""
    params = dict(model.named_parameters())
    expected = set(params)
    for name, value in weights:
        if name.endswith(skip):
            continue
        if isinstance(value, PackedWeight):
            _swap_packed(model, name, value)
        else:
            _copy(model, name, value)
        expected.discard(name)
    missing = sorted(name for name in expected if not name.endswith(skip))
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} weights, e.g. {missing[0]}")


def _copy(model: nn.Module, name: str, value: torch.Tensor) -> None:
    try:
        target = model.get_parameter(name)
    except AttributeError:
        raise ValueError(f"checkpoint has an unexpected weight {name}") from None
    if tuple(target.shape) != tuple(value.shape):
        raise ValueError(f"weight {name} has shape {tuple(value.shape)}, model expects {tuple(target.shape)}")
    with torch.no_grad():
        target.copy_(value)


def _swap_packed(model: nn.Module, name: str, packed: PackedWeight) -> None:
    """Replace the nn.Linear (or nn.Embedding) owning `name` by a PackedLinear (PackedEmbedding)
    that keeps the bytes packed."""
    if not name.endswith(".weight"):
        raise ValueError(f"packed tensor {name} is not a linear weight")
    module_name = name[: -len(".weight")]
    parent_name, _, child = module_name.rpartition(".")
    linear = model.get_submodule(module_name)
    if isinstance(linear, nn.Embedding) and (linear.num_embeddings, linear.embedding_dim) == tuple(packed.shape):
        setattr(model.get_submodule(parent_name), child, PackedEmbedding(packed))
        return
    if not isinstance(linear, nn.Linear) or (linear.out_features, linear.in_features) != tuple(packed.shape):
        raise ValueError(f"packed weight {name} of shape {packed.shape} does not fit {linear}")
    setattr(model.get_submodule(parent_name), child, PackedLinear(packed, linear.bias))
