"""Row operations on a left-padded, batched transformers DynamicCache.

Continuous batching with stock HF models: every running sequence is one row of a DynamicCache
whose rows are left-padded to a common length, with a 2-D attention mask marking real tokens.
Sequences leave by row selection (their memory is released), new ones join by left-padding the
shorter side and concatenating rows.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    for layer in cache.layers:
        if type(layer) is not DynamicLayer:
            raise NotImplementedError(
                f"cache layer {type(layer).__name__} is not supported; only full-attention models"
                " (DynamicLayer) can be batched continuously")
    return cache.layers


def select_rows(cache: DynamicCache, mask: torch.Tensor, row_ids: list[int]
                ) -> tuple[DynamicCache, torch.Tensor]:
    """Keep `row_ids` (in that order) and drop leading columns that are padding in every row."""
    index = torch.tensor(row_ids, dtype=torch.long, device=mask.device)
    mask = mask.index_select(0, index)
    num_pad_cols = int((mask.cumsum(dim=1) == 0).all(dim=0).sum())
    mask = mask[:, num_pad_cols:]
    for layer in _layers(cache):
        layer.keys = layer.keys.index_select(0, index)[:, :, num_pad_cols:]
        layer.values = layer.values.index_select(0, index)[:, :, num_pad_cols:]
    return cache, mask


def _left_pad(tensor: torch.Tensor, num_cols: int, dim: int) -> torch.Tensor:
    if num_cols == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = num_cols
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def concat_rows(cache_a: DynamicCache | None, mask_a: torch.Tensor | None,
                cache_b: DynamicCache, mask_b: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
    """Rows of `cache_a` followed by rows of `cache_b`, left-padded to a common length."""
    if cache_a is None or mask_a is None or mask_a.shape[0] == 0:
        return cache_b, mask_b
    len_a, len_b = mask_a.shape[1], mask_b.shape[1]
    length = max(len_a, len_b)
    mask = torch.cat([_left_pad(mask_a, length - len_a, 1), _left_pad(mask_b, length - len_b, 1)])
    for layer_a, layer_b in zip(_layers(cache_a), _layers(cache_b)):
        layer_a.keys = torch.cat([_left_pad(layer_a.keys, length - len_a, 2),
                                  _left_pad(layer_b.keys, length - len_b, 2)])
        layer_a.values = torch.cat([_left_pad(layer_a.values, length - len_a, 2),
                                    _left_pad(layer_b.values, length - len_b, 2)])
    return cache_a, mask


def num_cached_bytes(cache: DynamicCache | None) -> int:
    if cache is None:
        return 0
    return sum(t.numel() * t.element_size()
               for layer in cache.layers if getattr(layer, "keys", None) is not None
               for t in (layer.keys, layer.values))
