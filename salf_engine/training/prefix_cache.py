"""The prefix cache (issue 37): each training example's hidden states at the frozen floor, kept in memory, so
its next forward starts at the floor instead of running the frozen layers again.

The floor is :meth:`Strategy.floor <salf_engine.schedule.base.Strategy.floor>`: no row of any later step
trains below it, so ``layers[0..floor-1]`` and the embedding never change again and an example's states
there are the same in every epoch. They are written as a by-product of the example's own training forward
(:class:`~salf_engine.runner.prefix.FloorRows`; no extra pass), only its real tokens, in the dtype the
forward computed them in, keyed by the example's index in the training split and its tokens (a row whose
tokens changed is a miss, never a stale state), in memory or in a memory-mapped file in the run directory
(:class:`FileRows`). Where the floor rises (SALF's ``rising`` schedule), a row kept at a lower layer runs the
layers from there to the new floor in its next forward, and its states at the new floor replace the old.
:func:`plan_prefix_cache` decides from ``--prefix-cache`` whether and where the run keeps one: never where it
could not be exact (:func:`why_not_exact`). docs/prefix_cache.md.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from salf_engine.errors import ConfigError
from salf_engine.runner.prefix import FloorRows
from salf_engine.runtime.distributed import gather_objects, rank_and_world
from salf_engine.training.checkpoint import check_free_space

__all__ = ["CACHE_FILE", "MEMORY_SHARE", "FileRows", "PinnedRows", "PrefixCache", "copy_ahead", "floor_rows",
           "plan_prefix_cache", "why_not_exact"]

#: ``auto`` keeps the cache in memory while it takes at most this share of the free memory.
MEMORY_SHARE = 0.25
#: The device types whose memory cache is :class:`PinnedRows` (host memory, copied ahead).
PINNED_ON = ("cuda",)


class _Column:
    """One int64 column of :class:`FileRows`' row table, read and written like a list of ints."""

    def __init__(self, values: Tensor) -> None:
        self.values = values

    def __getitem__(self, i: int) -> int:
        return int(self.values[i])

    def __setitem__(self, i: int, value: int) -> None:
        self.values[i] = value


def _agreed(error: str | None, world: int) -> str | None:
    """The first rank's error (None: none had one), on every rank: all go on or all stop."""
    if world == 1:
        return error
    return next((e for e in gather_objects(error) if e is not None), None)


class _FlatRows:
    """Rows of ``[n_i, D]`` states back to back in one flat tensor ``data`` (set by the subclass), in split
    order: where each row lies, its view, and the bytes of the rows written."""

    def __init__(self, lengths: Sequence[int], hidden_size: int) -> None:
        self.lengths, self.width = list(lengths), hidden_size
        self.offsets = [0]
        for n in self.lengths:
            self.offsets.append(self.offsets[-1] + n * hidden_size)
        self.data = torch.empty(0)

    def _row(self, i: int) -> Tensor:
        return self.data[self.offsets[i]:self.offsets[i + 1]].view(self.lengths[i], self.width)

    def _fits(self, i: int, states: Tensor) -> bool:
        """Whether ``states`` have row ``i``'s shape (another shape: its tokens changed)."""
        return tuple(states.shape) == (self.lengths[i], self.width)

    def _bytes(self, written: Sequence[Any]) -> int:
        kept = sum(n for n, w in zip(self.lengths, written, strict=True) if w)
        return kept * self.width * self.data.element_size()


class FileRows(_FlatRows):
    """Row ``i``'s ``[n_i, D]`` states in one memory-mapped file (``torch.from_file``, a shared mapping):
    a table of each row's (written, layer, token key) and each rank's (hits, misses, skipped), then the rows
    back to back in split order; the whole file reserved when it is made (a full disk fails then, in one
    line, never halfway). A row reads as None until a process of this run wrote it: the file is made anew,
    and one left by an earlier or killed run is never trusted. Under ``world`` > 1 processes on one node,
    rank 0 makes the file and every rank maps it, so a row written by one rank is served to whichever rank
    runs it next."""

    def __init__(self, path: Path, lengths: Sequence[int], hidden_size: int, dtype: torch.dtype, *,
                 rank: int = 0, world: int = 1) -> None:
        super().__init__(lengths, hidden_size)
        self.path, self.rank, self.world = path, rank, world
        itemsize = torch.empty((), dtype=dtype).element_size()
        table = 8 * (3 * len(self.lengths) + 3 * world)  # int64 entries; the rows start 8-byte aligned
        size = table + max(self.offsets[-1], 1) * itemsize
        error = None
        if rank == 0:
            try:
                check_free_space(path.parent, size, "the prefix cache")
                with open(path, "wb") as f:
                    if hasattr(os, "posix_fallocate"):
                        os.posix_fallocate(f.fileno(), 0, size)
                    else:
                        f.truncate(size)
            except ConfigError as e:
                error = str(e)
            except OSError as e:
                error = f"cannot write the prefix cache file {path}: {e.strerror or e}"
        error = _agreed(error, world)
        if error is None:
            try:
                raw = torch.from_file(str(path), shared=True, size=size, dtype=torch.uint8)
            except (OSError, RuntimeError) as e:
                error = f"cannot map the prefix cache file {path} on rank {rank}: {e}"
            error = _agreed(error, world)
        if error is not None:
            raise ConfigError(error)
        ints = raw[:table].view(torch.int64)
        rows = ints[:3 * len(self.lengths)].view(-1, 3)
        self.have, self.layers, self.keys = _Column(rows[:, 0]), _Column(rows[:, 1]), _Column(rows[:, 2])
        self.counts = ints[3 * len(self.lengths):].view(world, 3)  # each rank's (hits, misses, skipped)
        self.data = raw[table:].view(dtype)

    def __getitem__(self, i: int) -> Tensor | None:
        if not self.have[i]:
            return None
        return self._row(i)

    def __setitem__(self, i: int, states: Tensor) -> None:
        if not self._fits(i, states):  # not this row's tokens: a miss from now on
            self.have[i] = 0
            return
        self._row(i).copy_(states)
        self.have[i] = 1

    @property
    def nbytes(self) -> int:
        """Bytes of the rows written (by every rank)."""
        return self._bytes(self.have.values.bool().tolist())

    def close(self) -> None:
        """Drop the mapping and (rank 0) the file (derived data)."""
        del self.data
        self.have = self.layers = self.keys = self.counts = None  # type: ignore[assignment]
        if self.rank == 0:
            self.path.unlink(missing_ok=True)


class PinnedRows(_FlatRows):
    """Row ``i``'s ``[n_i, D]`` states in one host buffer, back to back in split order: the GPU path's memory
    cache (docs/prefix_cache.md, "On a GPU"). On CUDA the buffer is pinned, a row's states are copied into it
    on a side stream once the forward that computed them is done, and :meth:`prefetch` starts copying the next
    step's rows back to the GPU on that stream while the current step runs, so a step waits only on its own
    rows' copy (an event), never on a synchronous transfer. On a CPU the same calls copy in place."""

    def __init__(self, lengths: Sequence[int], hidden_size: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__(lengths, hidden_size)
        self.device = device
        cuda = device.type == "cuda"
        self.data = torch.empty(self.offsets[-1], dtype=dtype, pin_memory=cuda)
        self.stream = torch.cuda.Stream(device) if cuda else None
        self.have = [0] * len(self.lengths)
        self.layers = [0] * len(self.lengths)
        self.keys: list[int | None] = [None] * len(self.lengths)
        self.ahead: dict[int, tuple[Tensor, Any]] = {}  # row -> (its states on the device, the copy's event)
        self.served_ahead = 0  # rows read that a prefetch had copied

    def _side(self) -> Any:
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def _to_device(self, i: int) -> tuple[Tensor, Any]:
        """Row ``i`` copied to the device on the side stream (after every copy queued there before), and the
        event that marks the copy done (None on a CPU)."""
        with self._side():
            states = self._row(i).to(self.device, non_blocking=True)
            event = None
            if self.stream is not None:
                event = torch.cuda.Event()
                event.record(self.stream)
        return states, event

    def prefetch(self, indices: Sequence[int]) -> None:
        """Start copying the rows ``indices`` hold (those written) to the device, to be taken by
        :meth:`__getitem__`."""
        for i in indices:
            if self.have[i] and i not in self.ahead:
                self.ahead[i] = self._to_device(i)

    def __getitem__(self, i: int) -> Tensor | None:
        if not self.have[i]:
            self.ahead.pop(i, None)
            return None
        ahead = self.ahead.pop(i, None)
        self.served_ahead += ahead is not None
        states, event = ahead or self._to_device(i)
        if event is not None:  # the compute stream waits for this row's copy, and owns its memory from now
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            states.record_stream(current)
        return states

    def __setitem__(self, i: int, states: Tensor) -> None:
        self.ahead.pop(i, None)  # a copy taken before this write is stale
        if not self._fits(i, states):  # not this row's tokens: a miss from now on
            self.have[i] = 0
            return
        if self.stream is not None:  # the forward that computed the states comes first
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            states.record_stream(self.stream)
        with self._side():
            self._row(i).copy_(states.detach(), non_blocking=True)
        self.have[i] = 1

    @property
    def nbytes(self) -> int:
        """Bytes of the rows written."""
        return self._bytes(self.have)


class PrefixCache:
    """Each training example's ``[n, D]`` states at the floor its last forward had (None until its first
    forward at a floor above 0), in memory or in ``file`` (:class:`FileRows`), with the layer they are at
    and the hits (rows served from the cache) and misses (rows that ran every layer below the floor)
    counted. ``floor``: the floor of a :meth:`lookup` that names none (a static freeze's), and after a
    lookup the floor it had (a rising floor's latest)."""

    def __init__(self, floor: int, num_rows: int, planned_bytes: int, *, file: FileRows | None = None,
                 pinned: PinnedRows | None = None, device: torch.device | None = None) -> None:
        self.floor = floor
        self.planned_bytes = planned_bytes
        self.file, self.pinned, self.device = file, pinned, device
        store = file if file is not None else pinned
        self._rows: Any = store if store is not None else [None] * num_rows
        self._keys: Any = store.keys if store is not None else [None] * num_rows
        self._layers: Any = store.layers if store is not None else [0] * num_rows  # each kept row's layer
        self.hits = 0  # this process's
        self.misses = 0
        self.skipped = 0  # layer forwards the served rows did not run (each: the layer it entered at)
        self._bytes: int | None = None  # what the file held when closed
        self._counts: tuple[int, int, int] | None = None  # every rank's hits, misses, skipped when closed

    @property
    def where(self) -> str:
        """``"memory"`` or ``"disk"``."""
        return "disk" if self.file is not None else "memory"

    def prefetch(self, indices: Sequence[int] | Tensor) -> None:
        """Start copying the kept states of the rows ``indices`` (a later step's) to the device, where the
        cache sits in pinned host memory (a GPU run); nothing otherwise. :meth:`lookup` takes them."""
        if self.pinned is not None:
            self.pinned.prefetch(_ints(indices))

    @property
    def nbytes(self) -> int:
        """Bytes the kept states take now."""
        if self.pinned is not None:
            return self.pinned.nbytes
        if self.file is not None:
            return self.file.nbytes if self._bytes is None else self._bytes
        return sum(t.numel() * t.element_size() for t in self._rows if t is not None)

    def close(self) -> None:
        """The end of training: a file cache drops its file (the counts and bytes stay for the summary)."""
        if self.file is not None and self._bytes is None:
            self._bytes, self._counts = self.file.nbytes, self.counts
            self.file.close()

    @property
    def counts(self) -> tuple[int, int, int]:
        """(hits, misses, skipped layer forwards) of every rank sharing the file (read after the step's
        collectives); this process's otherwise."""
        if self._counts is not None:
            return self._counts
        if self.file is None or self.file.world == 1:
            return self.hits, self.misses, self.skipped
        hits, misses, skipped = self.file.counts.sum(0).tolist()
        return int(hits), int(misses), int(skipped)

    def lookup(self, indices: Sequence[int] | Tensor, input_ids: Tensor, attention_mask: Tensor | None,
               floor: int | None = None) -> tuple[FloorRows | None, list[int]]:
        """The forward's :class:`FloorRows` at ``floor`` (the step's ``Strategy.floor``; default
        ``self.floor``): a row's states where kept for these same tokens at a layer at most the floor (a
        row kept below it runs the layers up to it), and each row's token key, for :meth:`keep`; counts the
        hits and misses. At floor 0 the forward runs without a prefix: (None, []), counted neither way."""
        self.floor = self.floor if floor is None else floor
        if self.floor == 0:
            return None, []
        idx = _ints(indices)
        ids = input_ids.cpu()
        mask = (attention_mask.cpu().bool() if attention_mask is not None
                else torch.ones_like(ids, dtype=torch.bool))
        keys = [hash(tuple(ids[r][mask[r]].tolist())) for r in range(len(idx))]
        cached = [self._rows[i] if self._keys[i] == key and self._layers[i] <= self.floor else None
                  for i, key in zip(idx, keys, strict=True)]
        if self.file is not None and self.device is not None:
            cached = [c.to(self.device) if c is not None else None for c in cached]
        layers = [self._layers[i] if c is not None else 0 for i, c in zip(idx, cached, strict=True)]
        served = sum(c is not None for c in cached)
        self.hits += served
        self.misses += len(idx) - served
        self.skipped += sum(layers)
        if self.file is not None:
            self.file.counts[self.file.rank] = torch.tensor([self.hits, self.misses, self.skipped])
        return FloorRows(self.floor, cached, layers=layers), keys

    def keep(self, indices: Sequence[int] | Tensor, keys: list[int], rows: FloorRows) -> None:
        """Keep the states the forward wrote (``rows.written``, at ``rows.floor``) for the rows it ran."""
        idx = _ints(indices)
        for i, key, states in zip(idx, keys, rows.written, strict=True):
            if states is not None:
                self._rows[i] = states
                self._layers[i] = rows.floor
                if self.file is None or self.file.have[i]:
                    self._keys[i] = key

    def summary(self) -> dict[str, Any]:
        """``summary.json``'s ``prefix_cache``."""
        hits, misses, skipped = self.counts
        return {"where": self.where, "bytes": self.nbytes, "floor": self.floor, "hits": hits,
                "misses": misses, "skipped_layer_forwards": skipped}


def _ints(indices: Sequence[int] | Tensor) -> list[int]:
    return [int(i) for i in (indices.tolist() if isinstance(indices, Tensor) else indices)]


@contextlib.contextmanager
def floor_rows(cache: PrefixCache | None, indices: Sequence[int] | Tensor | None, input_ids: Tensor,
               attention_mask: Tensor | None, floor: int | None = None) -> Iterator[FloorRows | None]:
    """A forward's rows at the floor: ``cache``'s :meth:`~PrefixCache.lookup` for the rows ``indices`` (None
    without a cache, or at floor 0), and once the forward inside the ``with`` is done, the states it
    computed kept (:meth:`~PrefixCache.keep`). The one home of a cached forward's lookup and keep."""
    if cache is None:
        yield None
        return
    rows, keys = cache.lookup(indices, input_ids, attention_mask, floor)
    yield rows
    if rows is not None:
        cache.keep(indices, keys, rows)


def copy_ahead(plans: Iterator[Any], cache: PrefixCache | None, *, fixed: bool) -> Iterator[Any]:
    """``plans``, each one yielded once the next one's kept rows have started copying to the device, so the
    copy runs beside this step (a cache in pinned host memory, a GPU run). Only where ``fixed`` (the
    strategy's ``plans_fixed``): there making the next plan before this step runs changes no plan and no
    checkpoint. Otherwise ``plans`` as they are."""
    if cache is None or cache.pinned is None or not fixed:
        yield from plans
        return
    upcoming = next(plans, None)
    while upcoming is not None:
        plan, upcoming = upcoming, next(plans, None)
        if upcoming is not None:
            cache.prefetch(upcoming.indices)
        yield plan


def why_not_exact(strategy: Any, wrapped: Any, *, world: int, wants_deviations: bool,
                  dropout: bool = True) -> str | None:
    """Why a cached run could differ from the recomputed one; None where it is exact (classification and
    prompt/response tasks alike). ``wrapped``: the :class:`~salf_engine.training.wrapping.TrainableModel`.
    The checks cover the layers below the highest floor the run reaches (``Strategy.max_floor``).
    ``dropout=False``: dropout is no reason (an evaluation runs in eval mode)."""
    floor = strategy.max_floor()
    if floor == 0:
        return (f"strategy {strategy.label!r} has floor 0 (a row may train layer 0): nothing below it stays "
                "fixed")
    if wants_deviations:
        return f"strategy {strategy.label!r} reads every layer's deviation from the training forward"
    # the plan's masks never train a layer below the floor; what still could: LoRA adapters there (the
    # optimizer holds them), and an embedding tied to a head that trains (train_head)
    trainable = {id(q) for q in wrapped.trainable}
    always = {id(q) for q in wrapped.rest_params} & trainable
    below = (("the embedding", wrapped.embed_params),
             *((f"layer {i}", wrapped.layer_params[i]) for i in range(floor)))
    for name, group in below:
        ids = {id(q) for q in group} & trainable
        if ids & always:
            return f"{name} lies below the floor (layer {floor}) and trains through the head tied to it"
        if ids and wrapped.lora:
            return f"{name} lies below the floor (layer {floor}) and has trainable LoRA adapters"
    if not dropout:
        return None
    parts = wrapped.parts
    modules = (("the embedding", parts.embed), *((f"layer {i}", parts.layers[i]) for i in range(floor)))
    for name, module in modules:
        if _has_dropout(module):
            return f"dropout is active in {name}, below the floor (layer {floor})"
    p = getattr(parts.decoder, "embedding_dropout", None)
    if isinstance(p, float) and p > 0:
        return f"embedding dropout {p:g} is active below the floor (layer {floor})"
    return None


def _has_dropout(module: nn.Module) -> bool:
    """Whether ``module`` holds a dropout with p > 0 (a module, or an attention's ``attention_dropout``)."""
    for sub in module.modules():
        if isinstance(sub, nn.modules.dropout._DropoutNd) and sub.p > 0:
            return True
        p = getattr(sub, "attention_dropout", None)
        if isinstance(p, float) and p > 0:
            return True
    return False


def planned_bytes(lengths: Sequence[int], hidden_size: int, dtype: torch.dtype) -> int:
    """Bytes of every training example's floor states: its tokens x D x the dtype's size."""
    return sum(lengths) * hidden_size * torch.empty((), dtype=dtype).element_size()


def free_memory() -> int | None:
    """The host's available memory in bytes, where a memory cache lives (on a GPU too: pinned); None:
    unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


#: The disk cache's file in the run directory (deleted when training ends).
CACHE_FILE = "prefix_cache.bin"


def plan_prefix_cache(where: str, strategy: Any, wrapped: Any, lengths: Sequence[int], *,
                      device: torch.device, run_dir: Path | None, world: int, wants_deviations: bool,
                      say: Callable[[str], None], epochs: int | None = None
                      ) -> tuple[PrefixCache | None, dict[str, Any]]:
    """The run's cache as ``--prefix-cache`` says (auto, memory, disk, off) for training examples of
    ``lengths`` tokens, and the summary it has while there is none. ``auto``: in memory while it takes at
    most :data:`MEMORY_SHARE` of the host's free memory (:class:`PinnedRows` on a GPU), else a memory-mapped
    file in ``run_dir`` (off without one). Says in one line what it keeps and how many bytes, or why there is
    none; ``memory`` and ``disk`` where it cannot be exact, and ``disk`` without a run directory or room for
    the file, raise :class:`~salf_engine.errors.ConfigError`. ``auto`` also keeps none for a run of one
    epoch (``epochs``, None where unknown): no example would be read back. Under ``world`` > 1 processes
    (every rank calls it) the ranks of one node share the file (``auto``, ``disk``; ``memory`` is refused),
    and ranks on several nodes keep none (docs/prefix_cache.md, "Several processes")."""
    off: dict[str, Any] = {"where": "off", "bytes": 0, "floor": None, "hits": 0, "misses": 0,
                           "skipped_layer_forwards": 0}
    if where == "off":
        say("prefix cache: off (--prefix-cache off)")
        return None, off
    reason = why_not_exact(strategy, wrapped, world=world, wants_deviations=wants_deviations)
    if reason is None and world > 1:
        reason = _several_nodes()
    if reason is not None:
        if where != "auto":
            raise ConfigError(f"--prefix-cache {where} cannot be exact here: {reason}")
        say(f"prefix cache: off ({reason})")
        return None, {**off, "reason": reason}
    if where == "auto" and epochs is not None and epochs <= 1:
        reason = "the run trains one epoch: no example's states would be read back"
        say(f"prefix cache: off ({reason})")
        return None, {**off, "reason": reason}
    floor, top, parts = strategy.floor(0), strategy.max_floor(), wrapped.parts
    hidden, dtype = int(parts.config.hidden_size), next(parts.embed.parameters()).dtype
    nbytes = planned_bytes(lengths, hidden, dtype)
    at = (f"at layer {floor} (of {parts.num_layers})" if floor == top else
          f"at the rising floor (layer {floor} at the start, at most {top} of {parts.num_layers})")
    what = (f"the hidden states {at} of {len(lengths)} training examples, {nbytes} bytes ({_mib(nbytes)}); "
            f"the layers below it run once per example{'' if floor == top else ' once frozen'}")
    note = ""
    if world > 1:  # the ranks of one node share one file (docs/prefix_cache.md, "Several processes")
        if where == "memory":
            raise ConfigError(f"--prefix-cache memory keeps one process's rows, but the {world} ranks share "
                              "one file in the run directory: use --prefix-cache disk or auto")
        note = f"shared by the {world} ranks"
        if where == "auto" and run_dir is None:
            reason = f"the {world} ranks share the cache through a file in the run directory: give --output"
            say(f"prefix cache: off ({reason})")
            return None, {**off, "floor": floor, "reason": reason}
        where = "disk"
    if where == "auto":
        free = free_memory()
        where = "memory"
        if free is None or nbytes > MEMORY_SHARE * free:
            note = ("the free memory is unknown" if free is None else
                    f"{_mib(nbytes)} would exceed {MEMORY_SHARE:g} of the {_mib(free)} free memory")
            if run_dir is None:
                say(f"prefix cache: off ({note}, and no run directory (--output) holds a disk cache)")
                return None, {**off, "floor": floor, "reason": note}
            where = "disk"
    if where == "disk":
        if run_dir is None:
            raise ConfigError("--prefix-cache disk keeps its file in the run directory: give --output")
        file = FileRows(Path(run_dir) / CACHE_FILE, lengths, hidden, dtype, rank=rank_and_world()[0],
                        world=world)
        say(f"prefix cache: on disk in {file.path}{f' ({note})' if note else ''}, {what}")
        return PrefixCache(floor, len(lengths), nbytes, file=file, device=device), off
    if device.type in PINNED_ON:  # pinned host memory, copied ahead on a side stream (PinnedRows)
        say(f"prefix cache: in pinned host memory, {what}")
        pinned = PinnedRows(lengths, hidden, dtype, device)
        return PrefixCache(floor, len(lengths), nbytes, pinned=pinned), off
    say(f"prefix cache: in memory, {what}")
    return PrefixCache(floor, len(lengths), nbytes), off


def _several_nodes() -> str | None:
    """Why the ranks cannot share one cache file: they run on several nodes (hosts), which share no page
    cache; None on one node. A collective: every rank calls it."""
    hosts = set(gather_objects(socket.gethostname()))
    if len(hosts) > 1:
        return f"the ranks run on {len(hosts)} nodes, which cannot share the cache's file"
    return None


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"
