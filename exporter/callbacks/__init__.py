"""ZEGO recording callbacks: the second event source, beside polling.

ZEGO POSTs a signed JSON callback when a task pauses, resumes, ends (normally or not) and when
its files are uploaded. Callbacks are at-most-3-times and may be lost, repeated or late, so
polling stays the source of truth for anything a callback missed; a callback makes a transition
visible sooner and adds the `quit_reason`. Whichever source sees a transition first counts it;
the other recognises it. `parse` checks the body, `listener` serves it, `reconcile` holds the
rules.
"""

from exporter.callbacks.listener import MAX_CLOCK_SKEW_S, CallbackReceiver
from exporter.callbacks.parse import REJECTED

__all__ = ["MAX_CLOCK_SKEW_S", "REJECTED", "CallbackReceiver"]
