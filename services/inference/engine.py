"""The torch engine: continuous batching on one worker thread, weight swaps between steps.

Requests arrive on the asyncio side (`generate`) and are handed to a single worker thread
that owns the model, so the event loop never blocks on torch. The worker keeps one running
batch: new requests are prefilled as a group and merged into it at step boundaries
(left-padded key/value caches), rows leave as soon as they finish, and each step decodes
every live row at once. A weight swap requested from any thread is applied by the worker
between two steps; every generated token is stamped with the policy version of the step
that produced it.

Weight sets per run (run isolation). The engine can hold several weight sets, keyed by run
(`None` is the checkpoint's own weights). One set is *active* (it is in the model's
parameters); the others wait in memory as tensors of the model's device and dtype. A batch
only ever holds rows of the active set: requests are admitted in arrival order, and when the
oldest waiting request belongs to another run the running batch stops taking new rows, drains,
and the worker then swaps that run's set in (a copy in each direction per tensor, between two
batches, never inside one). So a token is always sampled with its own run's weights, and each
run's rows wait at most one batch of another run. Memory: one full copy of the weights per
held set besides the active one; sets beyond `max_sets` are dropped least recently used first
(never the checkpoint's, the active one, a protected one or one with requests in flight).

Bounds (a replica under any load for any time holds per-request state of a size set here):
at most `max_batch_size` rows decode, and at most `max_queued_requests` rows wait for a place
(in `_queue`, `_parked`, `_gathering` or on their way to a prefill). A row arriving when that
many wait is refused at once with `QueueFull` (the API answers 503 with `Retry-After`): it is
transient overload and the caller retries. A waiting row keeps its place until the worker has
taken it out (prefilled, or dropped as cancelled), so the count is what the structures hold.
Every row is answered however it ends (finished, failed, cancelled mid-decode or while
waiting, refused at stop), and the answer releases its `_in_flight` count, so no forgotten row
pins a run's weight set or a place in the queue.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import inspect
import queue
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog
import torch

from services.inference.sampling import SamplingConfig, sample
from services.inference.text import IncrementalDetokenizer, find_stop
from shared.models import stop_token_ids

# Unbound lazy logger: binding at import would freeze structlog's config before telemetry.setup.
log = structlog.get_logger("inference.engine")

FinishReason = Literal["stop", "length"]
_WAKE = object()  # queue sentinel: wake the worker (swap pending, stopping)
_IDLE_POLL_S = 0.05


class InvalidRequest(ValueError):
    """The request cannot be served as asked (the API answers 400 with this text, and `code`
    when set: a machine-readable reason such as OpenAI's "context_length_exceeded")."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class EngineUnavailable(RuntimeError):
    """The engine is stopping or has failed (the API answers 503)."""


class RunNotLoaded(EngineUnavailable):
    """The run's weight set is not held by this engine (not loaded yet, or dropped): retry later."""


class QueueFull(EngineUnavailable):
    """Transient overload: `max_queued_requests` rows already wait for a place in the batch.
    Refused at once, before anything is held for the request (the API answers 503 with
    `Retry-After`); the caller retries."""

    code = "queue_full"


Key = str | None  # a weight set: a run id, or None for the checkpoint's own weights


@dataclass
class Generation:
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    versions: list[int]
    top_logprobs: list[list[tuple[int, float]]]
    text: str
    finish_reason: FinishReason
    policy_version: int


@dataclass(eq=False)
class _Row:
    prompt_ids: list[int]
    config: SamplingConfig
    future: concurrent.futures.Future[Generation]
    generator: torch.Generator | None = None
    detok: IncrementalDetokenizer | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_at: int | None = None  # text index where a stop string begins
    stopped_on_token: bool = False  # ended by an eos / stop token id, which the text omits
    cancelled: bool = False
    run: Key = None  # whose weight set samples this row
    queued: bool = False  # holds one of the `max_queued_requests` places (until prefilled or dropped)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.cancelled


@dataclass(eq=False)
class _Batch:
    """The running batch. Invariant: mask.shape[1] == key/value length of every cache layer."""

    rows: list[_Row]
    cache: Any
    mask: torch.Tensor  # [B, T] 1 = real token, 0 = left padding
    positions: torch.Tensor  # [B] position id of the next token fed
    last: torch.Tensor  # [B] last sampled token, the next step's input
    mergeable: bool


@dataclass
class EngineStats:
    requests_received: int = 0
    requests_finished: int = 0
    requests_cancelled: int = 0
    requests_failed: int = 0
    requests_refused: int = 0  # refused because the queue was full (QueueFull)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefills: int = 0
    decode_steps: int = 0
    weight_swaps: int = 0
    run_switches: int = 0  # weight sets swapped in between batches (several runs served)
    max_batch_size_seen: int = 0
    batch_sizes: Counter[int] = field(default_factory=Counter)  # decode steps by batch size
    prefill_sizes: Counter[int] = field(default_factory=Counter)  # prefills by group size
    started_at: float = field(default_factory=time.time)

    def snapshot(self) -> dict[str, Any]:
        # The worker thread inserts into these while we read: copy first (atomic under the GIL).
        batch_sizes, prefill_sizes = dict(self.batch_sizes), dict(self.prefill_sizes)
        steps = sum(batch_sizes.values())
        rows = sum(size * n for size, n in batch_sizes.items())
        return {
            "requests_received": self.requests_received,
            "requests_finished": self.requests_finished,
            "requests_cancelled": self.requests_cancelled,
            "requests_failed": self.requests_failed,
            "requests_refused": self.requests_refused,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "prefills": self.prefills,
            "decode_steps": self.decode_steps,
            "weight_swaps": self.weight_swaps,
            "run_switches": self.run_switches,
            "max_batch_size_seen": self.max_batch_size_seen,
            "mean_batch_size": rows / steps if steps else 0.0,
            "batch_sizes": {str(k): v for k, v in sorted(batch_sizes.items())},
            "prefill_sizes": {str(k): v for k, v in sorted(prefill_sizes.items())},
            "uptime_s": time.time() - self.started_at,
        }


class TorchEngine:
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_batch_size: int = 32,
        batch_wait_s: float = 0.005,
        version: int = 0,
        max_model_len: int | None = None,
        max_sets: int = 1,
        max_queued_requests: int = 1024,
    ) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.device: torch.device = next(model.parameters()).device
        self.max_batch_size = max_batch_size
        self.max_queued_requests = max(1, max_queued_requests)
        self.batch_wait_s = batch_wait_s
        self.version = version  # of the active set
        self.active: Key = None  # whose weights are in the model's parameters
        self.versions: dict[Key, int] = {None: version}  # every held set's version
        self.max_sets = max(1, max_sets)  # run sets held besides the checkpoint's
        self.protected: set[Key] = set()  # sets never dropped (the replica's default run)
        self.max_model_len = max_model_len or int(getattr(model.config, "max_position_embeddings", 0) or 4096)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.eos_ids = frozenset(stop_token_ids(model, tokenizer))
        self.pad_id = next(iter(sorted(self.eos_ids)), 0) if tokenizer.pad_token_id is None else tokenizer.pad_token_id
        self.stats = EngineStats()
        self.error: BaseException | None = None

        self._targets = model.state_dict()
        self._tied = _tied_groups(self._targets)
        self._keep_last = _logits_to_keep_kwarg(model)
        # Rows (at most `max_queued_requests` waiting, counted in `_queued`) and _WAKE sentinels
        # (one per swap request or stop; the worker drains them every step). Not a bounded
        # queue.Queue: the bound is checked under `_lock` before the put, which never blocks.
        self._queue: queue.Queue[Any] = queue.Queue()
        self._queued = 0  # rows holding a waiting place (see _Row.queued); under _lock
        # Set when a caller went away: the worker then drops the cancelled waiting rows at its
        # next step, so they stop holding places (else they would until the batch had room).
        self._cancel_seen = False
        self._closed = False  # the worker has ended: nothing put now would ever be served; under _lock
        self._lock = threading.Lock()
        # At most one entry per run (a newer swap supersedes a pending one); emptied every step.
        self._pending_swaps: dict[Key, tuple[dict[str, torch.Tensor], int, concurrent.futures.Future[int]]] = {}
        # Per held set (at most max_sets + 2: the checkpoint's and the active one), removed when dropped.
        self._sets: dict[Key, dict[str, torch.Tensor]] = {}  # inactive sets (the active one is the model's)
        self._last_used: dict[Key, float] = {None: time.monotonic()}
        # Rows submitted and not settled, per set; a set's entry goes at zero, so it holds at
        # most one entry per run with rows in flight (<= max_batch_size + max_queued_requests).
        self._in_flight: Counter[Key] = Counter()
        # Arrivals not admitted yet, oldest first (worker thread only); part of the queued bound.
        self._parked: deque[_Row] = deque()
        self._stopping = threading.Event()
        self._batch: _Batch | None = None
        # Arrivals taken while a batch decodes, held until enough gather for one prefill (worker
        # thread only; at most max_batch_size, and part of the queued bound).
        self._gathering: list[_Row] = []
        self._gathering_since = 0.0
        # The worker logs with the creator's context (run id and the like).
        self._thread = threading.Thread(
            target=contextvars.copy_context().run, args=(self._run,), name="inference-engine", daemon=True
        )

    # --- public, any thread --------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop admitting, let running rows finish (up to `timeout_s`), then end the worker."""
        self._stopping.set()
        self._queue.put(_WAKE)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("engine worker did not stop in time", timeout_s=timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    @property
    def active_rows(self) -> int:
        batch = self._batch
        return len(batch.rows) if batch is not None else 0

    @property
    def queued_requests(self) -> int:
        """Rows waiting for a place in the batch (at most `max_queued_requests`)."""
        return self._queued

    @property
    def requests_in_flight(self) -> int:
        """Rows submitted and not settled yet (waiting or decoding)."""
        with self._lock:
            return sum(self._in_flight.values())

    def validate(self, prompt_ids: list[int], config: SamplingConfig) -> None:
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty")
        if min(prompt_ids) < 0 or max(prompt_ids) >= self.vocab_size:
            raise InvalidRequest(f"prompt token ids must be in [0, {self.vocab_size})")
        if len(prompt_ids) + config.max_tokens > self.max_model_len:
            raise InvalidRequest(
                f"this model's maximum context length is {self.max_model_len} tokens; the request has "
                f"{len(prompt_ids)} prompt tokens and asks for {config.max_tokens} more",
                code="context_length_exceeded",
            )
        if any(t < 0 or t >= self.vocab_size for t in config.stop_token_ids):
            raise InvalidRequest(f"stop_token_ids must be in [0, {self.vocab_size})")

    def holds(self, run: Key) -> bool:
        return run in self.versions

    async def generate(self, prompt_ids: list[int], config: SamplingConfig, run: Key = None) -> Generation:
        """Sample with the weight set of `run` (None: the checkpoint's own weights).

        Raises `QueueFull` at once when `max_queued_requests` rows already wait."""
        self.validate(prompt_ids, config)
        if self._stopping.is_set() or not self.alive:
            raise EngineUnavailable("the engine is stopping" if self._stopping.is_set() else f"engine failed: {self.error}")
        row = _Row(prompt_ids=list(prompt_ids), config=config, future=concurrent.futures.Future(), run=run)
        # Made here so a row that cannot be set up fails alone, not the prefill group it joins
        # (and before it is counted anywhere, so a failure here leaves nothing behind).
        row.generator = config.make_generator(self.device)
        if config.stop:
            row.detok = IncrementalDetokenizer(self.tokenizer)
        # One critical section: the place is taken, the set counted in flight (so it cannot be
        # dropped before the row runs) and the row put, or nothing is; and never after the
        # worker's last drain (`_closed`), which would leave the row unanswered.
        with self._lock:
            if self._closed:
                raise EngineUnavailable(f"engine stopped: {self.error}" if self.error else "the engine is stopping")
            if self._queued >= self.max_queued_requests:
                self.stats.requests_refused += 1
                raise QueueFull(
                    f"inference is overloaded: {self._queued} requests already wait for a batch slot "
                    f"(max_queued_requests={self.max_queued_requests}); retry shortly"
                )
            if run not in self.versions:
                raise RunNotLoaded(f"the weights of run {run!r} are not loaded on this replica")
            self._in_flight[run] += 1
            self._last_used[run] = time.monotonic()
            self._queued += 1
            row.queued = True
            self.stats.requests_received += 1
            self._queue.put(row)
        row.future.add_done_callback(lambda _f, key=run: self._settled(key))
        try:
            return await asyncio.wrap_future(row.future)
        except asyncio.CancelledError:
            row.cancelled = True  # the worker drops the row at its next step
            self._cancel_seen = True
            raise

    def _settled(self, run: Key) -> None:
        with self._lock:
            self._in_flight[run] -= 1
            if self._in_flight[run] <= 0:
                del self._in_flight[run]

    def _unqueue(self, row: _Row) -> None:
        """The row left the waiting line (prefilled, or dropped by the worker): its place frees."""
        with self._lock:
            if row.queued:
                row.queued = False
                self._queued -= 1

    def swap_weights(
        self, state_dict: dict[str, torch.Tensor], version: int, run: Key = None
    ) -> concurrent.futures.Future[int]:
        """Schedule new weights for the set of `run`; they take effect between two decode steps
        (the active set) or are held until that run's next batch (another set).

        Checked here, in the caller's thread, so a bad state dict fails its caller and never
        the worker. The returned future resolves to the live version once applied (a swap
        overtaken by a newer one before it was applied resolves too, to the newer version).
        The tensors are kept as given (already on the model's device and dtype) when held.
        """
        self._check_state_dict(state_dict)
        state_dict = self._untied(state_dict)
        fut: concurrent.futures.Future[int] = concurrent.futures.Future()
        with self._lock:
            superseded = self._pending_swaps.get(run)
            self._pending_swaps[run] = (state_dict, int(version), fut)
        if superseded is not None:
            fut.add_done_callback(lambda f, old=superseded[2]: _chain(f, old))
        if self._thread.is_alive():
            self._queue.put(_WAKE)
        else:
            self._apply_swap()
        return fut

    def _untied(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One name per tied group: a held set is swapped in and out tensor by tensor, and two
        names of one storage would swap it twice (leaving it where it started)."""
        out: dict[str, torch.Tensor] = {}
        for name, tensor in state_dict.items():
            if not (self._tied.get(name, set()) & out.keys()):
                out[name] = tensor
        return out

    # --- worker thread -------------------------------------------------------------------

    def _run(self) -> None:
        log.info("engine worker started", device=str(self.device), max_batch_size=self.max_batch_size)
        try:
            with torch.inference_mode():
                while True:
                    self._apply_swap()
                    if self._cancel_seen:
                        self._drop_cancelled()
                    if self._stopping.is_set():
                        self._reject_queued()
                        if self._batch is None and not self._gathering:
                            break
                    new = self._admit()
                    if new:
                        try:
                            self._prefill(new)
                        except Exception as exc:  # noqa: BLE001 - e.g. out of memory: fail only these rows
                            self._fail_rows(new, exc, "prefill failed")
                    if self._batch is not None:
                        try:
                            self._step()
                        except Exception as exc:  # noqa: BLE001
                            rows, self._batch = self._batch.rows if self._batch else [], None
                            self._fail_rows(rows, exc, "decode step failed")
        except BaseException as exc:  # noqa: BLE001 - record, fail every waiter, never hang them
            self.error = exc
            log.exception("engine worker died")
            self._fail_all(exc)
        finally:
            # No put can follow this (generate checks `_closed` under the lock), so the last
            # drain answers every row that will ever arrive.
            with self._lock:
                self._closed = True
            self._reject_queued()
        log.info("engine worker stopped")

    def _fail_rows(self, rows: list[_Row], exc: Exception, what: str) -> None:
        log.exception(what, rows=len(rows))
        for row in rows:
            self.stats.requests_failed += 1
            _settle(row.future, exc=exc)

    def _admit(self) -> list[_Row]:
        batch = self._batch
        if batch is not None and not batch.mergeable:
            return []
        capacity = self.max_batch_size - (len(batch.rows) if batch else 0)
        if batch is not None:
            return self._gather(capacity)
        rows, self._gathering = self._gathering, []
        if not rows:
            # Idle: wait for a first request, then briefly for its concurrent peers.
            self._pull(timeout=None if self._parked else _IDLE_POLL_S)
            first = self._pop(switch=True)
            if first is None:
                return []
            rows.append(first)
            deadline = time.monotonic() + self.batch_wait_s
            while len(rows) < capacity and (left := deadline - time.monotonic()) > 0:
                if (row := self._pop(scan=True)) is not None:
                    rows.append(row)
                elif self._parked:
                    break  # only other runs' requests wait: start this batch now
                elif not self._pull(timeout=left):
                    break  # woken (a swap is pending, or stopping)
        self._pull(timeout=None)
        # A new batch takes every waiting request of its run, also those behind another run's:
        # runs that alternate still batch, and the others wait one batch at most.
        while len(rows) < capacity and (row := self._pop(scan=True)) is not None:
            rows.append(row)
        return rows

    def _gather(self, capacity: int) -> list[_Row]:
        """While a batch decodes, arrivals are prefilled together: once they fill the batch or
        the first has waited `batch_wait_s`. Clients answered by the same decode step send their
        next requests a few ms apart; prefilling each as it comes costs a forward pass apiece
        (measured through the capture proxy: 1.5x the prefills, 10-20 % fewer tokens/s).
        Only rows of the active set join; once another run's row is next in line, no more do."""
        self._pull(timeout=None)
        while len(self._gathering) < capacity and (row := self._pop()) is not None:
            if not self._gathering:
                self._gathering_since = time.monotonic()
            self._gathering.append(row)
        if not self._gathering:
            return []
        full = len(self._gathering) >= capacity
        waited = time.monotonic() - self._gathering_since >= self.batch_wait_s
        if full or waited or self._stopping.is_set() or self._parked:
            rows, self._gathering = self._gathering, []
            return rows
        return []

    def _pull(self, timeout: float | None) -> bool:
        """Move queued requests to `_parked`, in arrival order. With `timeout`, wait up to that
        long for the first one. False when woken by a swap or stop instead."""
        block = timeout
        while True:
            try:
                item = self._queue.get(timeout=block) if block is not None else self._queue.get_nowait()
            except queue.Empty:
                return True
            if item is _WAKE:
                if block is not None:
                    return False
                continue
            block = None  # the first one came: take the rest without waiting
            self._parked.append(item)

    def _pop(self, switch: bool = False, scan: bool = False) -> _Row | None:
        """The oldest parked request if it uses the active set (FIFO across runs, so no run
        starves). With `switch` (no batch running, none gathering) the oldest request's set is
        made active first; with `scan`, the oldest of the active set's wherever it waits."""
        if scan and self._parked and self._parked[0].run != self.active:
            for i, row in enumerate(self._parked):
                if row.run == self.active and not row.cancelled:
                    del self._parked[i]
                    if row.future.set_running_or_notify_cancel():
                        return row
                    self._drop_waiting(row, None)
                    return self._pop(scan=True)
            return None
        while self._parked:
            row = self._parked[0]
            if row.cancelled or row.future.cancelled():
                self._parked.popleft()
                self._drop_waiting(row, None)
                continue
            if row.run != self.active:
                if not switch:
                    return None
                if not self._activate(row.run):
                    self._parked.popleft()
                    self._drop_waiting(row, RunNotLoaded(f"the weights of run {row.run!r} were dropped; retry"))
                    continue
            self._parked.popleft()
            if not row.future.set_running_or_notify_cancel():
                self._drop_waiting(row, None)
                continue
            return row
        return None

    def _drop_cancelled(self) -> None:
        """Drop every waiting row whose caller went away (wherever it waits), freeing its place."""
        self._cancel_seen = False  # before the scan: a cancel after it sets it again
        self._pull(timeout=None)
        if any(row.cancelled or row.future.cancelled() for row in self._parked):
            keep: deque[_Row] = deque()
            for row in self._parked:
                if row.cancelled or row.future.cancelled():
                    self._drop_waiting(row, None)
                else:
                    keep.append(row)
            self._parked = keep
        if any(row.cancelled for row in self._gathering):
            for row in self._gathering:
                if row.cancelled:  # its future is running: settled here
                    self._drop_waiting(row, None)
            self._gathering = [row for row in self._gathering if not row.cancelled]

    def _drop_waiting(self, row: _Row, exc: BaseException | None) -> None:
        """A waiting row leaves without being served: answered with `exc` (None: it was
        cancelled), and its place in the queue frees."""
        if exc is None:
            self.stats.requests_cancelled += 1
            exc = EngineUnavailable("cancelled")
        self._unqueue(row)  # first: a caller that was answered finds its place free
        _settle(row.future, exc=exc)

    def _activate(self, run: Key) -> bool:
        """Swap the set of `run` into the model's parameters and keep the previous one in the
        tensors it came in (one copy each way, no extra memory). Only between batches."""
        assert self._batch is None and not self._gathering
        incoming = self._sets.pop(run, None)
        if incoming is None:
            return False
        with torch.no_grad():
            for name, tensor in incoming.items():
                target = self._targets[name]
                previous = target.clone()
                target.copy_(tensor)
                tensor.copy_(previous)
        self._sets[self.active] = incoming
        old, self.active, self.version = self.active, run, self.versions[run]
        self.stats.run_switches += 1
        log.debug("weight set switched", old_run=old, run=run, version=self.version)
        self._drop_extra_sets(keep={run})
        return True

    def _prefill(self, rows: list[_Row]) -> None:
        for row in rows:  # they leave the waiting line: the running batch bounds them now
            self._unqueue(row)
        version = self.version
        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row.prompt_ids)
            ids[i, width - n :] = torch.tensor(row.prompt_ids, dtype=torch.long)
            mask[i, width - n :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=_new_cache(self.model.config),
            use_cache=True,
            **self._keep_last,
        )
        batch = _Batch(
            rows=rows,
            cache=out.past_key_values,
            mask=mask,
            positions=mask.sum(-1),
            last=ids[:, -1],
            mergeable=_mergeable(out.past_key_values),
        )
        self.stats.prefills += 1
        self.stats.prefill_sizes[len(rows)] += 1
        self.stats.prompt_tokens += sum(len(r.prompt_ids) for r in rows)
        self._accept(batch, out.logits[:, -1, :], version)
        batch = self._evict(batch)
        if batch is None:
            return
        self._batch = batch if self._batch is None else _merge(self._batch, batch)

    def _step(self) -> None:
        batch = self._evict(self._batch)  # rows cancelled since the last step
        self._batch = batch
        if batch is None:
            return
        version = self.version
        mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch.rows), 1))], dim=1)
        out = self.model(
            input_ids=batch.last[:, None],
            attention_mask=mask,
            position_ids=batch.positions[:, None],
            past_key_values=batch.cache,
            use_cache=True,
        )
        batch.cache, batch.mask, batch.positions = out.past_key_values, mask, batch.positions + 1
        self.stats.decode_steps += 1
        self.stats.batch_sizes[len(batch.rows)] += 1
        self.stats.max_batch_size_seen = max(self.stats.max_batch_size_seen, len(batch.rows))
        self._accept(batch, out.logits[:, -1, :], version)
        self._batch = self._evict(batch)

    def _accept(self, batch: _Batch, logits: torch.Tensor, version: int) -> None:
        """Sample one token per row, record it, and finish rows that are done."""
        picked = sample(logits, [r.config for r in batch.rows], [r.generator for r in batch.rows])
        for i, row in enumerate(batch.rows):
            token = picked.tokens[i]
            row.token_ids.append(token)
            row.logprobs.append(picked.logprobs[i])
            row.versions.append(version)
            if row.config.top_logprobs:
                row.top.append(picked.top[i])
            self._check_finished(row, token)
        self.stats.generated_tokens += len(batch.rows)
        batch.last = torch.tensor(picked.tokens, dtype=torch.long, device=self.device)

    def _check_finished(self, row: _Row, token: int) -> None:
        cfg = row.config
        if (not cfg.ignore_eos and token in self.eos_ids) or token in cfg.stop_token_ids:
            row.finish_reason, row.stopped_on_token = "stop", True
        elif row.detok is not None:
            new = row.detok.push(token)
            if (at := find_stop(row.detok.text, len(new), cfg.stop)) is not None:
                row.finish_reason, row.stop_at = "stop", at
        if row.finish_reason is None and (
            len(row.token_ids) >= cfg.max_tokens or len(row.prompt_ids) + len(row.token_ids) >= self.max_model_len
        ):
            row.finish_reason = "length"
        if row.finish_reason is not None:
            self._finish(row)

    def _finish(self, row: _Row) -> None:
        if row.stop_at is not None and row.detok is not None:
            text = row.detok.text[: row.stop_at]
        else:
            ids = row.token_ids[:-1] if row.stopped_on_token else row.token_ids
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
        assert row.finish_reason is not None
        result = Generation(
            prompt_ids=row.prompt_ids,
            token_ids=row.token_ids,
            logprobs=row.logprobs,
            versions=row.versions,
            top_logprobs=row.top,
            text=text,
            finish_reason=row.finish_reason,
            policy_version=row.versions[-1] if row.versions else self.version,
        )
        self.stats.requests_finished += 1
        _settle(row.future, result=result)

    def _evict(self, batch: _Batch | None) -> _Batch | None:
        """Drop finished and cancelled rows, and padding columns no remaining row needs."""
        if batch is None:
            return None
        for row in batch.rows:
            if row.cancelled and row.finish_reason is None:
                # Its future is running, so the caller's cancel could not settle it: settle it
                # here, or the row's in-flight count would pin its run's weight set forever.
                self.stats.requests_cancelled += 1
                _settle(row.future, exc=EngineUnavailable("cancelled"))
        keep = [i for i, row in enumerate(batch.rows) if not row.done]
        if len(keep) == len(batch.rows):
            return batch
        if not keep:
            return None
        idx = torch.tensor(keep, device=self.device)
        rows = [batch.rows[i] for i in keep]
        mask, positions, last = batch.mask[idx], batch.positions[idx], batch.last[idx]
        if not batch.mergeable:
            batch.cache.batch_select_indices(idx)
            return _Batch(rows, batch.cache, mask, positions, last, mergeable=False)
        start = int(mask.any(dim=0).to(torch.int8).argmax())
        kv = [(k[idx, :, start:], v[idx, :, start:]) for k, v in _kv_of(batch.cache)]
        return _Batch(rows, _cache_of(kv), mask[:, start:], positions, last, mergeable=True)

    def _apply_swap(self) -> None:
        with self._lock:
            pending, self._pending_swaps = self._pending_swaps, {}
        for run, (state_dict, version, fut) in pending.items():
            try:
                with torch.no_grad():
                    if run == self.active:
                        for name, tensor in state_dict.items():
                            self._targets[name].copy_(tensor)
                    else:  # held until that run's next batch
                        self._sets[run] = state_dict
            except Exception as exc:  # noqa: BLE001 - shapes were checked; report anything else to the caller
                log.exception("weight swap failed", version=version, run=run)
                fut.set_exception(exc)
                continue
            old = self.versions.get(run)
            with self._lock:
                self.versions[run] = version
                self._last_used.setdefault(run, time.monotonic())
            if run == self.active:
                self.version = version
            self.stats.weight_swaps += 1
            log.debug("weights swapped", run=run, old_version=old, version=version, active_rows=self.active_rows,
                     active=run == self.active)  # fmt: skip
            fut.set_result(version)
        if pending:
            self._drop_extra_sets(keep=set(pending))

    def _drop_extra_sets(self, keep: set[Key]) -> None:
        """Keep at most `max_sets` run sets: drop the least recently used idle ones (never one
        just loaded: it was loaded because a request wants it)."""
        with self._lock:
            spare = [k for k in self.versions if k is not None and k != self.active and k not in self.protected
                     and k not in keep and not self._in_flight.get(k)]  # fmt: skip
            extra = len(self.versions) - 1 - self.max_sets
            for run in sorted(spare, key=lambda k: self._last_used.get(k, 0.0))[: max(extra, 0)]:
                self.versions.pop(run, None)
                self._sets.pop(run, None)
                self._last_used.pop(run, None)
                log.info("weight set dropped", run=run, reason=f"more than {self.max_sets} runs held")

    def _check_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        unknown = sorted(set(state_dict) - set(self._targets))
        if unknown:
            raise ValueError(f"state dict has {len(unknown)} keys the model does not: {unknown[:5]}")
        for name, tensor in state_dict.items():
            if tuple(tensor.shape) != tuple(self._targets[name].shape):
                raise ValueError(
                    f"{name}: shape {tuple(tensor.shape)} does not match the model's {tuple(self._targets[name].shape)}"
                )
        missing = [n for n in self._targets if n not in state_dict and not (self._tied.get(n, set()) & state_dict.keys())]
        if missing:
            raise ValueError(f"state dict lacks {len(missing)} of the model's tensors: {missing[:5]}")

    def _reject_queued(self) -> None:
        self._pull(timeout=None)
        while self._parked:
            row = self._parked.popleft()
            self._unqueue(row)
            _settle(row.future, exc=EngineUnavailable("the engine is stopping"))  # no-op if cancelled

    def _fail_all(self, exc: BaseException) -> None:
        rows = (self._batch.rows if self._batch is not None else []) + self._gathering
        self._batch, self._gathering = None, []
        for row in rows:
            self._unqueue(row)  # a gathering row still held its place
            _settle(row.future, exc=EngineUnavailable(f"engine failed: {exc}"))
        self._stopping.set()
        self._reject_queued()


# --- helpers ------------------------------------------------------------------------------


def _settle(
    fut: concurrent.futures.Future[Any], *, result: Any = None, exc: BaseException | None = None
) -> None:
    try:
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass  # the waiter went away


def _chain(done: concurrent.futures.Future[int], superseded: concurrent.futures.Future[int]) -> None:
    if done.exception() is not None:
        superseded.set_exception(done.exception())  # type: ignore[arg-type]
    else:
        superseded.set_result(done.result())


def _tied_groups(state: dict[str, torch.Tensor]) -> dict[str, set[str]]:
    """Names sharing storage (tied embeddings): loading any one of them loads all."""
    by_ptr: dict[int, set[str]] = {}
    for name, t in state.items():
        by_ptr.setdefault(t.untyped_storage().data_ptr(), set()).add(name)
    return {name: group - {name} for group in by_ptr.values() for name in group}


def _logits_to_keep_kwarg(model: Any) -> dict[str, int]:
    """Ask for last-position logits only at prefill when the model supports it."""
    params = inspect.signature(model.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return {name: 1}
    return {}


def _new_cache(config: Any) -> Any:
    from transformers import DynamicCache

    try:
        return DynamicCache(config=config)  # knows which layers are sliding-window
    except TypeError:  # older transformers
        return DynamicCache()


def _mergeable(cache: Any) -> bool:
    """Full-attention dynamic caches can be left-padded and concatenated; anything else can't."""
    from transformers import DynamicCache

    if type(cache) is not DynamicCache:
        return False
    layers = getattr(cache, "layers", None)
    return layers is None or all(type(layer).__name__ == "DynamicLayer" for layer in layers)


def _kv_of(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return list(zip(cache.key_cache, cache.value_cache))


def _cache_of(kv: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)
    return cache


def _merge(a: _Batch, b: _Batch) -> _Batch:
    """Concatenate two batches, left-padding the shorter cache so positions line up at the right."""
    width = max(a.mask.shape[1], b.mask.shape[1])

    def pad_kv(t: torch.Tensor) -> torch.Tensor:
        extra = width - t.shape[2]
        return t if extra == 0 else torch.cat([t.new_zeros((*t.shape[:2], extra, *t.shape[3:])), t], dim=2)

    def pad_mask(m: torch.Tensor) -> torch.Tensor:
        extra = width - m.shape[1]
        return m if extra == 0 else torch.cat([m.new_zeros((m.shape[0], extra)), m], dim=1)

    kv = [
        (torch.cat([pad_kv(ka), pad_kv(kb)]), torch.cat([pad_kv(va), pad_kv(vb)]))
        for (ka, va), (kb, vb) in zip(_kv_of(a.cache), _kv_of(b.cache))
    ]
    return _Batch(
        rows=a.rows + b.rows,
        cache=_cache_of(kv),
        mask=torch.cat([pad_mask(a.mask), pad_mask(b.mask)]),
        positions=torch.cat([a.positions, b.positions]),
        last=torch.cat([a.last, b.last]),
        mergeable=True,
    )


# --- construction -------------------------------------------------------------------------


def check_engine_kind(kind: str) -> None:
    """Fail early and clearly for engines this build cannot run."""
    if kind == "torch":
        return
    if kind != "vllm":
        raise ValueError(f"unknown engine {kind!r}; choose torch or vllm")
    import importlib.util

    if importlib.util.find_spec("vllm") is None or not torch.cuda.is_available():
        raise RuntimeError(
            "engine 'vllm' needs the `gpu` extra (pip install 'relayrl[gpu]') on a CUDA machine; "
            "use --engine torch (the default) on this machine"
        )
    raise RuntimeError("engine 'vllm' is not available in this build yet; use --engine torch")


def load_engine(
    model_spec: str,
    *,
    model_dir: Any,
    device: str = "auto",
    dtype: str = "auto",
    max_batch_size: int = 32,
    batch_wait_s: float = 0.005,
    max_model_len: int | None = None,
    version: int = 0,
    max_sets: int = 1,
    max_queued_requests: int = 1024,
) -> tuple[TorchEngine, Any]:
    """Resolve, load and start the engine; returns it with the checkpoint path it loaded."""
    from shared.models import load_causal_lm, load_tokenizer, resolve_device, resolve_dtype, resolve_model

    path = resolve_model(model_spec, model_dir)
    dev = resolve_device(device)
    started = time.monotonic()
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, dev, resolve_dtype(dtype, dev))
    engine = TorchEngine(
        model,
        tokenizer,
        max_batch_size=max_batch_size,
        batch_wait_s=batch_wait_s,
        version=version,
        max_model_len=max_model_len,
        max_sets=max_sets,
        max_queued_requests=max_queued_requests,
    )
    engine.start()
    log.info(
        "model loaded",
        path=str(path),
        device=str(dev),
        dtype=str(next(model.parameters()).dtype),
        load_s=round(time.monotonic() - started, 3),
        max_model_len=engine.max_model_len,
    )
    return engine, path
