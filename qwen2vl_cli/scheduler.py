"""The model's one worker thread and the line of requests waiting for it: batches of the same
sampling settings, first come first served; with continuous batching, waiting requests join a
running batch as its rows end (rows.py's Running). Each answer goes back as soon as its row ends."""

from __future__ import annotations

import sys
import threading
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field, replace

from qwen2vl_cli.backend import LocalBackend
from qwen2vl_cli.config import debug_enabled
from qwen2vl_cli.errors import Cancelled
from qwen2vl_cli.output import printable
from qwen2vl_cli.serve_requests import ApiError
from qwen2vl_cli.types import GenerationOptions, Prepared


@dataclass
class Job:
    prepared: Prepared
    gen: GenerationOptions
    stream: bool
    future: Future = field(default_factory=Future)
    on_text: object = None  # streaming: called with each chunk from the worker thread
    cancel: threading.Event = field(default_factory=threading.Event)  # the client went away


def _settle(future: Future, result=None, error: BaseException | None = None) -> None:
    """Hand a result over; a future that is already settled or cancelled is left as it is."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


class Engine:
    """The model's one worker thread and its bounded line of waiting jobs.

    Jobs whose client went away leave the line at once: they hold no place against new arrivals.
    """

    def __init__(self, session: LocalBackend, batch_size: int, queue_size: int, continuous: bool | None = None,
                 on_answer=lambda result: None):
        """`continuous`: requests join running batches (None: on a GPU, where a decode step costs
        about the same for one row or many; on a CPU every row costs its share, and fixed batches
        of equal settings measured faster, bench/RESULTS.md). `on_answer(result)`: each answer
        handed back (the server's metrics), on this engine's thread."""
        self.session, self.batch_size, self.queue_size, self.on_answer = session, batch_size, queue_size, on_answer
        self.rows = 0  # rows of the running batch not ended yet
        wanted = session.device != "cpu" if continuous is None else continuous
        self.continuous = wanted and batch_size > 1 and session.streams_batches
        self._line: deque[Job] = deque()
        self._changed = threading.Condition()
        threading.Thread(target=self._work, name="qvl-engine", daemon=True).start()

    def waiting(self) -> int:
        """Requests in the line."""
        with self._changed:
            return len(self._line)

    def _drop_cancelled(self) -> None:  # holding self._changed
        for job in [j for j in self._line if j.cancel.is_set()]:
            self._line.remove(job)
            _settle(job.future, error=Cancelled())

    def submit(self, job: Job) -> Future:
        with self._changed:
            self._drop_cancelled()
            if len(self._line) >= self.queue_size:
                raise ApiError(503, "server_overloaded", f"{self.queue_size} requests are waiting: retry later", headers={"Retry-After": "1"})
            self._line.append(job)
            self._changed.notify()
        return job.future

    def _next(self, block: bool) -> Job | None:
        """The next job whose client is still there."""
        with self._changed:
            while True:
                self._drop_cancelled()
                if self._line:
                    return self._line.popleft()
                if not block:
                    return None
                self._changed.wait()

    def _work(self) -> None:
        while True:  # nothing a request does may end this thread
            try:
                job = self._next(block=True)
                if job.stream and not self.session.streams_batches:  # transformers' generate streams one row
                    self._run([job])
                    continue
                batch, later = [job], []
                while len(batch) < self.batch_size and (other := self._next(block=False)) is not None:
                    (batch if self._joins(other, job.gen) else later).append(other)
                if later:  # back at the head of the line, ahead of new arrivals: the next batch takes them
                    with self._changed:
                        self._line.extendleft(reversed(later))
                self._run(batch)
            except BaseException as e:  # noqa: BLE001 - log and serve the next request
                log_bug("the engine loop", e)

    def _joins(self, job: Job, gen: GenerationOptions) -> bool:
        """Whether `job` may run in a batch of `gen`'s: the same options (a stream only where the
        engine streams batches), or with continuous batching, the same sampling (rows keep their own lengths)."""
        if not self.session.streams_batches:
            return job.gen == gen and not job.stream
        if not self.continuous:
            return job.gen == gen
        return replace(job.gen, max_new_tokens=1, min_new_tokens=None) == replace(gen, max_new_tokens=1, min_new_tokens=None)

    def _run(self, batch: list[Job]) -> None:
        """A batch through the model; each answer is handed over as soon as its row ends. With
        continuous batching, waiting requests with the same sampling join it as its rows end, in
        the order they came: once the next in line cannot join, no one else does, so nobody waits
        behind later arrivals."""
        from qwen2vl_cli.rows import Row

        jobs = list(batch)  # by row number: the batch's, then those that joined it
        gen = batch[0].gen

        def row(job: Job) -> Row:
            return Row(job.prepared.text, list(job.prepared.loaded), job.gen, job.cancel, job.on_text if job.stream else None)

        try:
            self.rows = len(batch)
            running = self.session.start([row(j) for j in batch], self.batch_size if self.continuous else 0)
            closed = not self.continuous  # once the head of the line cannot join, the batch takes no one else
            while running.live:
                for number, outcome in running.advance():
                    self.rows -= 1
                    self._hand_over(jobs[number], outcome)
                while not closed and running.open():
                    with self._changed:
                        self._drop_cancelled()
                        if not self._line:
                            break
                        if not self._joins(self._line[0], gen):
                            closed = True
                            break
                        job = self._line.popleft()
                    joining = row(job)
                    try:
                        fits = running.fits(joining)  # its processor inputs are made here, outside the lock
                    except Exception as e:  # noqa: BLE001 - that request's failure alone
                        _settle(job.future, error=e)
                        continue
                    if not fits:  # too long for the room left: it heads the line for the next batch
                        with self._changed:
                            self._line.appendleft(job)
                        closed = True
                        break
                    jobs.append(job)
                    try:
                        running.join(joining)
                        self.rows += 1
                    except Exception as e:  # noqa: BLE001 - its failure (out of memory in its prefill), not the batch's
                        _settle(job.future, error=e)
        except Exception as e:  # every request of the batch, and every one that joined it, gets the error
            for job in jobs:
                _settle(job.future, error=e)
        finally:
            self.rows = 0

    def _hand_over(self, job: Job, outcome) -> None:
        result = self.session.finish(job.prepared, outcome, job.gen, whole_json=False)
        if isinstance(result, Exception):
            _settle(job.future, error=result)
        else:
            self.on_answer(result)
            _settle(job.future, result)


def log_bug(where: str, e: BaseException) -> None:
    """A 500 is a bug: one line on the server's stderr, the traceback with QVL_DEBUG=1."""
    if debug_enabled():
        import traceback

        traceback.print_exception(e)
    message = " ".join(str(e).split())[:300]
    print(printable(f"qvl serve: error in {where}: {type(e).__name__}: {message}", lines=False), file=sys.stderr, flush=True)
