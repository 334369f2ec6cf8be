"""How the processes of a run cooperate in the data phases of an iteration.

The pipeline (:mod:`trl_hsstar.pipeline`) calls four collective operations, through a :class:`Collective`:

- ``gather(items)``: every process passes a list; the main process gets them concatenated in process order
  (the others get ``None``);
- ``broadcast(obj)``: the main process's ``obj``, returned on every process;
- ``barrier()``: wait until every process arrives;
- ``process_index`` / ``num_processes``.

:class:`Collective` itself is the one-process case (every operation is the identity), and
:class:`AccelerateCollective` runs them on Accelerate's ``gather_object`` and ``broadcast_object_list``, so the
same pipeline runs under ``accelerate launch`` on any number of processes. Every process must make the same
sequence of collective calls: the pipeline guarantees it by deciding everything that branches (which phases
are done, which chunks are left) on the main process and broadcasting it.

This module imports only the standard library (Accelerate is imported when an :class:`AccelerateCollective`
is built).
"""

from __future__ import annotations

from typing import Any

__all__ = ["AccelerateCollective", "Collective"]


class Collective:
    """One process: the main one, alone. Subclass it for a real process group."""

    num_processes: int = 1
    process_index: int = 0

    @property
    def is_main(self) -> bool:
        return self.process_index == 0

    def gather(self, items: list) -> list | None:
        """Every process's ``items``, concatenated in process order, on the main process; ``None`` elsewhere."""
        return list(items)

    def broadcast(self, obj: Any) -> Any:
        """The main process's ``obj`` on every process (pickled; keep it small)."""
        return obj

    def barrier(self) -> None:
        """Return once every process has called it."""


class AccelerateCollective(Collective):
    """The collective operations of an ``accelerate`` process group (one ``PartialState`` per process).

    Args:
        state: an ``accelerate.Accelerator`` or ``accelerate.PartialState``; by default the current
            ``PartialState``.
    """

    def __init__(self, state: Any = None):
        if state is None:
            from accelerate import PartialState

            state = PartialState()
        self.state = state
        self.num_processes = int(state.num_processes)
        self.process_index = int(state.process_index)

    def gather(self, items: list) -> list | None:
        if self.num_processes == 1:
            return list(items)
        from accelerate.utils import gather_object

        gathered = gather_object(list(items))
        return list(gathered) if self.is_main else None

    def broadcast(self, obj: Any) -> Any:
        if self.num_processes == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        box = [obj if self.is_main else None]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def barrier(self) -> None:
        if self.num_processes > 1:
            self.state.wait_for_everyone()
