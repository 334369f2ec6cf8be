"""Callbacks for the HS-STaR loop, in the style of ``transformers.TrainerCallback``.

Any callback given to the trainer (``callbacks=[...]``) may define these extra events; a plain
``TrainerCallback`` that does not define them is simply skipped. Each receives ``(args, state, control)`` like
every Trainer event, ``model`` and ``processing_class``, plus the iteration index and the event's data as keyword
arguments:

``on_iteration_begin(args, state, control, iteration, problems, **kwargs)``
    Before sampling. ``problems`` is the iteration's list of :class:`~trl_hsstar.records.Problem`.
``on_levels_estimated(args, state, control, iteration, difficulties, resamples, **kwargs)``
    After difficulty estimation and allocation: ``difficulties`` maps problem id to
    :class:`~trl_hsstar.difficulty.Difficulty`, ``resamples`` to the re-samples it will get.
``on_rows_selected(args, state, control, iteration, rows, **kwargs)``
    The training rows (SFT rows or DPO pairs) before they are saved. Return a new list to filter or
    change them; return ``None`` to keep them as they are.
``on_iteration_end(args, state, control, iteration, stats, **kwargs)``
    After the iteration's model is saved; ``stats`` is what ``stats.json`` holds.

Setting ``control.should_training_stop = True`` in any of them stops the loop at the end of the current
iteration (before its training pass if set before it).
"""

from __future__ import annotations

from transformers import TrainerCallback

__all__ = ["HSStarCallback", "emit"]

HSSTAR_EVENTS = ("on_iteration_begin", "on_levels_estimated", "on_rows_selected", "on_iteration_end")


class HSStarCallback(TrainerCallback):
    """Base class with no-op HS-STaR events; subclass it and override what you need."""

    def on_iteration_begin(self, args, state, control, **kwargs):
        pass

    def on_levels_estimated(self, args, state, control, **kwargs):
        pass

    def on_rows_selected(self, args, state, control, **kwargs):
        pass

    def on_iteration_end(self, args, state, control, **kwargs):
        pass


def emit(callbacks, event: str, args, state, control, **payload):
    """Call ``event`` on every callback that defines it; for ``on_rows_selected``, return the rows as the
    callbacks left them (a callback returns a new list, or ``None`` to keep them)."""
    if event not in HSSTAR_EVENTS:
        raise ValueError(f"unknown HS-STaR event {event!r}; the events are {HSSTAR_EVENTS}")
    rows = payload.get("rows")
    for callback in callbacks:
        fn = getattr(callback, event, None)
        if fn is None:
            continue
        out = fn(args, state, control, **payload)
        if event == "on_rows_selected" and out is not None:
            if not isinstance(out, list):
                raise TypeError(
                    f"{type(callback).__name__}.on_rows_selected returned {type(out).__name__}; return a list of "
                    "rows, or None to keep them."
                )
            rows = payload["rows"] = out
    return rows
