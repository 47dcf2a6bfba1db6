"""GPU batches made on a feeder thread, used on the consumer's thread: which stream each side works on.

torch's current stream is per thread. A feeder thread that queued its copies on "the current stream" would queue
them on *its* current stream (the default one), while the consumer may run its step on another (a user's loop
under `with torch.cuda.stream(s)`, CUDA graphs): the step would read batches before their copy and erasing ran.

So the feeder works on a side stream of the loader's, made current on its thread (`feeder_setup`): every torch op
and every DALI call there (feed_input, outputs, the copy out, erasing, the labels' copy, a cache gather) is queued
on it. After a batch's work the feeder records an event (`ready`). The consumer, in its own `next()`, hands the
batch over to the stream current *on its thread at that moment* (`receive`): that stream waits for the event (on
the device: the host never blocks) and the batch's tensors are marked as used there (`record_stream`), so the
caching allocator does not give their memory to the feeder's next batch while the consumer's kernels still read
it. On the CPU (or when the iterator runs inline on the consumer's thread) all of this is a no-op.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["StreamHandoff"]


class StreamHandoff:
    """One loader's side stream and the hand-over of its batches (see the module docstring).

    `threaded=False`: the producer runs on the consumer's own thread, whose current stream it already uses.
    """

    def __init__(self, device: torch.device, *, threaded: bool = True, side=None):
        self.device = device
        self.side = None
        if device.type == "cuda" and threaded:
            self.side = side if side is not None else torch.cuda.Stream(device)

    def feeder_setup(self) -> None:
        """On the feeder thread, before any work: its device and current stream (both per thread in torch)."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.side is not None:
            torch.cuda.set_stream(self.side)

    def stream(self):
        """The stream the producer's work is queued on (its thread's current one); None on the CPU."""
        if self.device.type != "cuda":
            return None
        return self.side if self.side is not None else torch.cuda.current_stream(self.device)

    def ready(self):
        """On the feeder, after a batch's work was queued: an event the consumer's stream will wait on."""
        if self.side is None:
            return None
        event = torch.cuda.Event()
        event.record(self.side)
        return event

    def receive(self, tensors: Iterable[torch.Tensor], event) -> None:
        """On the consumer's thread: order its current stream after `event`; the tensors are used there."""
        if event is None:
            return
        consumer = torch.cuda.current_stream(self.device)
        consumer.wait_event(event)
        for t in tensors:
            t.record_stream(consumer)
