"""Samplers: generate ``num_samples[i]`` completions for each already-rendered prompt.

:class:`Sampler` is the interface (:mod:`trl_hsstar.sampling.base`, standard library only); each backend
is one module: :class:`TransformersSampler` (``model.generate``), :class:`VLLMSampler` (a vLLM engine in a child
process, possibly under another interpreter) and :class:`VLLMServerSampler` (an external ``vllm serve``, started
with :func:`launch_vllm_server` or ``hsstar vllm-serve``). Backends are imported lazily, so
``from trl_hsstar.sampling import Sampler, SamplingParams`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .base import Completion, Sampler, SamplingParams, SamplingStats, expand_requests, validate_request

if TYPE_CHECKING:  # pragma: no cover
    from .transformers_sampler import TransformersSampler
    from .vllm_sampler import EngineError, VLLMSampler
    from .vllm_server import VLLMServer, VLLMServerSampler, launch_vllm_server

_LAZY = {
    "TransformersSampler": "transformers_sampler",
    "VLLMSampler": "vllm_sampler",
    "EngineError": "vllm_sampler",
    "VLLMServer": "vllm_server",
    "VLLMServerSampler": "vllm_server",
    "launch_vllm_server": "vllm_server",
}

__all__ = [
    "Completion",
    "EngineError",
    "Sampler",
    "SamplingParams",
    "SamplingStats",
    "TransformersSampler",
    "VLLMSampler",
    "VLLMServer",
    "VLLMServerSampler",
    "expand_requests",
    "launch_vllm_server",
    "validate_request",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
