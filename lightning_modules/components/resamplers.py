"""Which resampler a config chooses: the project's perceiver or SEED-Story's Qwen-style one.

A resampler option of a module takes either config; its ``kind`` says which (a config without
``kind`` is a perceiver). The module gives the widths and the number of queries, and exports store
the config with its ``kind``, so an export always reloads with the classes that wrote it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from torch import nn

from lightning_modules.components.perceiver import PerceiverConfig, PerceiverResampler
from lightning_modules.components.qwen_resampler import QwenResampler, QwenResamplerConfig

ResamplerConfig = PerceiverConfig | QwenResamplerConfig


def build_resampler(config: ResamplerConfig | None, input_dim: int, num_queries: int, output_dim: int,
                    query_input_dim: int = 0) -> nn.Module:
    """A resampler reading ``input_dim`` tokens into ``num_queries`` x ``output_dim``."""
    if isinstance(config, QwenResamplerConfig):
        grid = math.isqrt(num_queries)
        if grid * grid != num_queries:
            raise ValueError(f"the Qwen resampler lays its queries on a square grid: {num_queries} queries is not a square")
        if query_input_dim:
            raise ValueError("queries_from_previous needs the perceiver resampler (the Qwen one has fixed learned queries)")
        return QwenResampler(grid, output_dim, config.heads, kv_dim=input_dim, norm_eps=config.norm_eps)
    return PerceiverResampler(dataclasses.replace(config or PerceiverConfig(), input_dim=input_dim, num_queries=num_queries,
                                                  output_dim=output_dim, query_input_dim=query_input_dim))


def resampler_config_from_dict(data: dict[str, Any] | None) -> ResamplerConfig | None:
    """The config an export stored (``dataclasses.asdict``); one without ``kind`` is a perceiver."""
    if not data:
        return None
    data = dict(data)
    if data.get("kind") == "qwen":
        return QwenResamplerConfig(**data)
    return PerceiverConfig(**data)
