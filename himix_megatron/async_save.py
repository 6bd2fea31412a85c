"""--async-save: checkpoint shards written by a background process while training goes on.

This is megatron-core's own async path (megatron-core 0.16.1): `dist_checkpointing.save(...,
async_sharded_save=True)` plans the save and returns an `AsyncRequest`; its `TemporalAsyncCaller` copies the
shards to host memory (`preload_fn`) and forks one writer process per rank; `maybe_finalize_async_calls` asks
every rank, by an all-reduce, whether its writer has finished, and once all have, runs the request's finalize
functions on every rank: megatron's (the `.metadata` file, gathered write results, failures raised on every
rank), then ours (checkpoint.save_checkpoint's `finish`: himix.json, the manifest, the rename of
`.tmp-iter_N` and the move of `latest`). So a rank killed at any moment of an async save leaves the previous
checkpoint complete and `latest` naming it: the new one is still `.tmp-iter_N`.

Choices:
- At most one save in flight: scheduling a save first finishes the previous one. A second one would hold a
  second host copy of the whole training state (~16 bytes per parameter and rank with the optimizer).
- The temporal (fork-per-save) caller, Megatron-LM's default. Megatron's persistent worker receives the
  tensors through a queue; on the CPU the "host copy" of a CPU tensor is the tensor itself, so it would write
  values the training had changed meanwhile. A forked writer's memory is a copy-on-write snapshot taken at
  the fork, which is exact on both devices.
- On the CPU the collectives run on gloo through cpu_compat's torch.cuda stand-ins (megatron-core allocates
  their flags with `device=torch.cuda.current_device()`), so CPU tests run the same code as a GPU job.
- The writer is forked from the rank, so platform.tie_children_to_this_process (set up in initialize) makes
  it die with its rank instead of outliving a killed run.
"""

from __future__ import annotations

from typing import Callable, Optional


class AsyncSaves:
    """The rank's in-flight checkpoint save (at most one). Every method is collective over all ranks."""

    def __init__(self):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self._queue = AsyncCallsQueue(persistent=False)
        self._what: Optional[str] = None
        self._discard: Optional[Callable[[], None]] = None

    @property
    def pending(self) -> Optional[str]:
        """The directory being written, or None."""
        return self._what

    def schedule(self, request, what: str, discard: Callable[[], None]) -> None:
        """Start writing `request` (megatron's AsyncRequest, its finalize functions attached) to `what`;
        `discard()` removes what a failed write left."""
        self.finish()
        self._queue.schedule_async_request(request)
        self._what, self._discard = what, discard

    def finish(self, blocking: bool = True) -> bool:
        """Finalize the pending save if every rank's writer is done (or, blocking, once they are).

        Returns whether nothing is pending afterwards. A failed write raises CheckpointError on every rank;
        the previous checkpoint is then still the one `latest` names.
        """
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

        from himix_megatron.checkpoint import CheckpointError

        if self._what is None:
            return True
        try:
            finalized = self._queue.maybe_finalize_async_calls(blocking=blocking)
        except (Exception, CheckpointException) as e:  # megatron raises on every rank; name the checkpoint
            what, self._what = self._what, None
            self._discard()  # every rank's writer has ended (finalizing waits for that), so nothing writes there
            raise CheckpointError(f"{what}: the background write failed, so it stays unfinished and the previous "
                                  f"checkpoint remains the latest: {e}") from e
        if finalized:
            self._what = None
        return self._what is None

    def close(self) -> None:
        """Wait for the pending save; for the end of a run."""
        self.finish(blocking=True)
        self._queue.close()


def writer_processes(saves: AsyncSaves) -> list:
    """The forked writer processes of the pending save on this rank (for tests and the fault campaign)."""
    return [call.async_caller.process for call in saves._queue.async_calls
            if getattr(call.async_caller, "process", None) is not None]

