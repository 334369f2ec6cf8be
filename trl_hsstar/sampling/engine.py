"""The run's generation backend: the user's sampler, transformers ``generate`` on the policy, or a vLLM engine.

:class:`Generation` owns the backend's lifecycle over a run: a vLLM engine (or a server connection) starts once,
on the first iteration; before each later iteration it loads the previous iteration's weights (its LoRA adapter,
for a PEFT model) in place; during each training pass it may sleep to hand its GPU memory to training; it closes
when the run ends.
"""

from __future__ import annotations

import os

import torch

from .._compat import keep_bnb_4bit_weights_trainable_on_cpu
from .._utils import accelerator_available, model_name
from .base import Sampler
from .transformers_sampler import TransformersSampler

__all__ = ["Generation", "cpu_engine_env", "engine_cuda_devices"]


class Generation:
    """Where a run's samples come from; see the module docstring."""

    def __init__(self, args, accelerator, processing_class, sampler: Sampler | None = None):
        self.args, self.accelerator, self.processing_class = args, accelerator, processing_class
        self.user_sampler = sampler
        self.model = None
        self.engine = None

    def _unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def _is_peft(self) -> bool:
        from peft import PeftModel

        return isinstance(self._unwrapped(), PeftModel)

    def sampler(self, model, iteration: int, previous_model_dir) -> Sampler:
        """The sampler of ``iteration``, generating from ``model`` (saved at ``previous_model_dir`` after the last
        iteration)."""
        self.model = model
        keep_bnb_4bit_weights_trainable_on_cpu(model)
        if self.user_sampler is not None:
            return self.user_sampler
        if not self.args.use_vllm:
            return TransformersSampler(
                model,
                self.processing_class,
                batch_size=self.args.generation_batch_size,
                accelerator=self.accelerator,
                progress=False,  # the loop's bar of each phase counts the samples: no bar inside a bar
            )
        if self.engine is None:
            self.engine = self._start_vllm()
        if iteration > 0:
            self._sync_vllm(previous_model_dir)
        return self.engine

    def sleep(self) -> None:
        self._vllm_sleep(True)

    def wake(self) -> None:
        self._vllm_sleep(False)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def _start_vllm(self):
        """The vLLM sampler of this run: an engine on the starting checkpoint (the 16-bit base for LoRA/QLoRA,
        whose adapter is served on top; nothing is ever merged into quantized weights), or the external server,
        checked to answer before any sampling."""
        from .vllm_sampler import VLLMSampler

        args = self.args
        if args.vllm_mode == "server":
            from .vllm_server import VLLMServerSampler

            url = args.vllm_server_base_url or f"http://{args.vllm_server_host}:{args.vllm_server_port}"
            sampler = VLLMServerSampler(
                url,
                self.processing_class,
                timeout=args.vllm_server_timeout,
                request_timeout=args.vllm_request_timeout,
            )
            sampler.wait_ready()
            return sampler
        base = model_name(self.model)
        if not base:
            raise ValueError(
                "`use_vllm=True` starts the engine from the model's checkpoint, and this model has none "
                "(`config._name_or_path` is empty): pass the model as an id or path, or save it first."
            )
        engine = {
            "seed": args.seed,
            "gpu_memory_utilization": args.vllm_gpu_memory_utilization,
            "tensor_parallel_size": args.vllm_tensor_parallel_size,
            "enable_prefix_caching": True,
            "enable_sleep_mode": args.vllm_enable_sleep_mode,
        }
        if args.vllm_max_model_length:
            engine["max_model_len"] = args.vllm_max_model_length
        dtype = getattr(self._unwrapped(), "dtype", None)
        if dtype is not None:  # the policy's own precision (vLLM's "auto" would take float32 down to 16 bits)
            engine["dtype"] = str(dtype).removeprefix("torch.")
        if self._is_peft():
            model = self._unwrapped()
            rank = max(int(getattr(c, "r", 8)) for c in model.peft_config.values())
            engine.update(
                enable_lora=True, max_loras=2, max_lora_rank=max(8, rank)
            )  # base and adapter requests
        engine.update(args.vllm_engine_kwargs or {})
        env = cpu_engine_env()
        if not env and torch.cuda.is_available():
            # each training process's engine on its own GPU(s), not all of them on the first one
            state = self.accelerator.state
            devices = engine_cuda_devices(
                os.environ.get("CUDA_VISIBLE_DEVICES"),
                torch.cuda.device_count(),
                state.local_process_index,
                int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes)),
                args.vllm_tensor_parallel_size,
            )
            env["CUDA_VISIBLE_DEVICES"] = devices
        rank = self.accelerator.process_index
        return VLLMSampler(
            base,
            self.processing_class,
            python=args.vllm_python,
            engine_kwargs=engine,
            env=env,
            startup_timeout=args.vllm_server_timeout,
            request_timeout=args.vllm_request_timeout,
            log_path=os.path.join(args.output_dir, f"vllm-{rank}.log"),
        )

    def _sync_vllm(self, previous) -> None:
        """Give the engine the policy to sample from: the last completed iteration's model (its LoRA adapter, for a
        PEFT model). A server is shared by every process: the main one loads, the others wait and then use the same
        weights or adapter."""
        load = self.engine.load_adapter if self._is_peft() else self.engine.load_weights
        if self.args.vllm_mode != "server":  # an engine of this process's own
            load(previous)
            return
        main = self.accelerator.is_main_process
        if main:
            load(previous)
        self.accelerator.wait_for_everyone()
        if not main:
            load(previous, register=False)  # recorded, to be loaded again should the server restart

    def _vllm_sleep(self, sleep: bool) -> None:
        """Free (``sleep``) or restore the engine's GPU memory around a training pass (`vllm_enable_sleep_mode`)."""
        if self.engine is None or not self.args.vllm_enable_sleep_mode:
            return
        if self.args.vllm_mode == "server" and not self.accelerator.is_main_process:
            return
        self.engine.sleep() if sleep else self.engine.wake()


def cpu_engine_env() -> dict[str, str]:
    """The environment of a vLLM engine on a machine without an accelerator (vLLM's CPU build): a small KV cache
    and every core; empty where an accelerator is present."""
    if accelerator_available():
        return {}
    return {
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        "VLLM_CPU_OMP_THREADS_BIND": os.environ.get(
            "VLLM_CPU_OMP_THREADS_BIND", f"0-{max(1, os.cpu_count() or 1) - 1}"
        ),
    }


def engine_cuda_devices(
    visible: str | None, device_count: int, local_index: int, local_processes: int, tensor_parallel_size: int
) -> str:
    """``CUDA_VISIBLE_DEVICES`` of the engine of training process ``local_index`` (of ``local_processes`` on this
    machine), for ``vllm_mode="colocate"``: its own GPU, or its own ``tensor_parallel_size`` GPUs, out of the ones
    visible to the trainer. A layout that does not fit is refused with the fix."""
    devices = [d.strip() for d in (visible or "").split(",") if d.strip()] or [
        str(i) for i in range(device_count)
    ]
    if local_processes == 1:  # one process: its engine may span as many visible GPUs as it asks for
        needed, mine = tensor_parallel_size, devices
    else:
        needed = local_processes * tensor_parallel_size
        mine = devices[local_index * tensor_parallel_size : (local_index + 1) * tensor_parallel_size]
    if needed > len(devices):
        raise ValueError(
            f"`vllm_tensor_parallel_size={tensor_parallel_size}` with {local_processes} training process(es) on this "
            f"machine needs {needed} GPUs for the colocated engines, and {len(devices)} are visible. Lower "
            "`vllm_tensor_parallel_size`, or run vLLM as a server on GPUs of its own (`vllm_mode='server'`, "
            "`hsstar vllm-serve`)."
        )
    return ",".join(mine)
