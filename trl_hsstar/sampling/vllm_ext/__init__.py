"""Code that runs inside vLLM's processes (standard library + vLLM only, no trl-hsstar imports).

This folder is put on ``PYTHONPATH`` of the engine process and of a server started with
:func:`trl_hsstar.sampling.launch_vllm_server`, so that vLLM can import :mod:`hsstar_vllm` by name (its worker
extension, ``hsstar_vllm.WorkerExtension``) under any interpreter that has vLLM.
"""

from pathlib import Path

PATH = str(Path(__file__).resolve().parent)
WORKER_EXTENSION = "hsstar_vllm.WorkerExtension"
