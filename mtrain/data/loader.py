"""The trainer's streaming loader: WebDataset shards to packed, augmented, resumable batches.

- A *stream* is one DataLoader worker of one rank; what it reads each epoch, and how a position
  carries over to another number of streams, is ``mtrain.data.dealing``'s.
- Uneven ranks: the training stream is infinite. A stream goes on to its next epoch when its
  share of this one is done, so every rank takes exactly the steps the trainer asks for and no
  rank waits at an epoch end for one with more shards. The trainer counts steps (or tokens).
- The position (epoch, block, pieces done in it, tokens waiting to be packed) is the whole
  state: a resume reopens one shard, skips to the block start and replays nothing else.
  torchdata's StatefulDataLoader carries each worker's position with its batches.
- Packing: [BOS, label ids..., tokens..., EOS] back to back, cut into windows of seq_len + 1
  tokens overlapping by one; no padding. Attention crosses piece boundaries (standard GPT
  packing); BOS tells the model where a new piece starts.
- Validation reads the whole split on every rank in card order, packs it the same way and
  deals the sequences round-robin to the ranks, dropping the last incomplete round: every rank
  gets the same number of batches (ZeRO-3 collectives need that) and, together, the same
  sequences whatever the world size.
"""

import functools
import multiprocessing as mp
import multiprocessing.forkserver
import os
import signal
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from data_pipeline import retries, storage
from data_pipeline.errors import require
from data_pipeline.reader import (
    RAISE,
    SKIP,
    CorruptShardError,
    ShardReader,
    ShardShare,
    StoredPiece,
    load_card,
    split_shares,
)
from data_pipeline.tokenizer import MusicTokenizer
from mtrain.data.augmentation import Augmenter
from mtrain.data.controls import AttributeControlsConfig, ControlTraining, with_controls
from mtrain.data.dealing import (
    DataPosition,
    Dealing,
    as_ranges,
    check_enough_pieces,
    handed_over,
    range_numbers,
    stream_shares,
)
from mtrain.data.fill_in_middle import InfillTraining
from mtrain.data.packing import SequencePacker
from mtrain.data.views import ViewPairs, ViewSpec, view_batch
from mtrain.distributed import processes

# Loader workers start after the process group, whose gloo/NCCL threads may hold a lock at
# the moment of a fork: a forked worker could then hang before its first line (seen in a 2-rank
# Slurm job). A fork server is a clean, single-threaded parent to fork them from.
WORKERS = mp.get_context("forkserver")


@dataclass
class DataConfig:
    # A dataset written by `python -m data_pipeline.prepare`: a directory or an fsspec URL.
    path: str = "data/bach"
    # The tokenizer artifact the model is built for; the dataset's own when None.
    tokenizer: str | None = None
    num_workers: int = 2
    # Pieces shuffled together; 1 reads them in (shuffled) shard order.
    shuffle_buffer: int = 1000
    # Packed windows each stream holds and hands out in a seeded random order; 1 hands them
    # out as packed. Packed in order, a step's windows continue the pieces of the step before:
    # with few streams (one rank) the model then learns less a step and its loss spikes at
    # the peak learning rate (bench/README.md, "One rank learned less a step").
    window_shuffle: int = 64
    seed: int = 0
    # Largest pitch transposition in semitones; 0 turns it off. Drums are never transposed.
    transpose_range: int = 5
    # Largest shift of a piece's velocities, in velocity bins; 0 turns it off.
    velocity_shift: int = 0
    # "skip": warn, count and go on; "raise": stop at the first damaged shard.
    on_corrupt_shard: str = SKIP
    # How long object storage may keep failing (refused, reset, stalled, 5xx, throttled) before
    # a read gives up; reads are retried with backoff until then. $MTRAIN_STORAGE_RETRY_S or
    # 600 s when None.
    storage_retry_s: float | None = None
    # Share of training pieces rearranged for fill-in-the-middle over bars
    # (mtrain.data.fill_in_middle); 0 trains on plain pieces only. Validation and evaluation
    # always read plain pieces.
    infill_rate: float = 0.0
    # Bar attribute controls (mtrain.data.controls): which attributes, at which rates, open
    # the bars of training pieces (never infilling ones); off by default.
    attribute_controls: AttributeControlsConfig = field(default_factory=AttributeControlsConfig)

    def __post_init__(self):
        require(
            self,
            "data",
            [
                (self.num_workers >= 0, "num_workers", "must be at least 0"),
                (self.shuffle_buffer >= 1, "shuffle_buffer", "must be at least 1"),
                (self.window_shuffle >= 1, "window_shuffle", "must be at least 1 (1: off)"),
                (self.transpose_range >= 0, "transpose_range", "must be at least 0 (0: off)"),
                (self.velocity_shift >= 0, "velocity_shift", "must be at least 0 (0: off)"),
                (
                    self.on_corrupt_shard in (SKIP, RAISE),
                    "on_corrupt_shard",
                    f"must be {SKIP!r} or {RAISE!r}",
                ),
                (0 <= self.infill_rate <= 1, "infill_rate", "must be in [0, 1] (0: off)"),
                (
                    self.storage_retry_s is None or self.storage_retry_s >= 0,
                    "storage_retry_s",
                    "must be at least 0 seconds (0: no retries)",
                ),
            ],
        )


def start_worker_server() -> None:
    """Starts the fork server the loader workers come from with the preemption warnings (USR1,
    USR2) ignored. Slurm sends them to every process of the job; the rank checkpoints on them,
    but a worker would die of one (the default action) and take the rank down at its next
    batch. An ignored signal stays ignored across exec: in the server and in every worker it
    forks."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in processes.PREEMPTION_WARNINGS}
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def worker_init_fn(rank_pid: int, worker_id: int) -> None:
    """Runs first in each loader worker: the worker dies with its rank, even a SIGKILLed one.
    Its parent is the fork server, so torch's watchdog (comparing os.getppid()) and a parent-
    death signal would watch the server, which itself waits on a pipe every worker keeps open:
    without this, a killed rank leaves the server and its workers running for good. With the
    workers gone, the server sees its pipe close and exits too (``processes.watch_rank``)."""
    processes.watch_rank(rank_pid)


def open_dataset(cfg: DataConfig) -> tuple[dict, MusicTokenizer]:
    """The dataset card and the configured tokenizer, once they are known to belong together."""
    card = load_card(cfg.path)
    tokenizer_path = cfg.tokenizer or storage.join(cfg.path, card["tokenizer"]["path"])
    tokenizer = MusicTokenizer.load(tokenizer_path)
    expected = card["tokenizer"]["hash"]
    if tokenizer.hash != expected:
        raise ValueError(
            f"tokenizer mismatch: dataset {cfg.path} was tokenized with tokenizer "
            f"{expected[:12]} (its dataset.json) but data.tokenizer={tokenizer_path} is "
            f"{tokenizer.hash[:12]}; use the dataset's own artifact "
            f"({storage.join(cfg.path, card['tokenizer']['path'])}) or prepare the dataset "
            "again with this tokenizer"
        )
    return card, tokenizer


def _stream_states(loader: dict, workers: int) -> list[dict | None]:
    """Each stream's TrainStream state inside a StatefulDataLoader state (None for a worker
    that had given no batch yet), in worker order."""
    if "_snapshot" not in loader:
        return [loader.get("dataset_state")]
    snapshots = loader["_snapshot"]["_worker_snapshots"]
    return [(snapshots.get(f"worker_{w}") or {}).get("dataset_state") for w in range(workers)]


def held_windows(state: dict, seq_len: int) -> list[np.ndarray]:
    """The windows a stream's state holds (``TrainStream.state_dict``), each seq_len + 1."""
    held = np.frombuffer(state.get("held") or b"", dtype=np.int64)
    return list(held.reshape(-1, seq_len + 1).copy())


def unpacked(at: dict, seq_len: int) -> list[int]:
    """A stream's tokens not yet trained on, as one run for another stream's packer: its held
    windows, then its carry. Each window's first token is only the input of its second (the
    previous window's target), and so is the carry's first: those are dropped after the first
    window, so that no token is a target twice (the next token reads another context there)."""
    held = [window.tolist() for window in held_windows(at, seq_len)]
    if not held:
        return list(at["carry"])
    tokens = held[0] + [t for window in held[1:] for t in window[1:]]
    return tokens + list(at["carry"])[1:]


def inputs_and_targets(windows: list[np.ndarray] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Collates windows of seq_len + 1 tokens into (inputs, targets), each [batch, seq_len];
    windows a loader worker stacked already are used as they came."""
    tokens = torch.from_numpy(windows if isinstance(windows, np.ndarray) else np.stack(windows))
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


class TrainStream(IterableDataset):
    """One rank's infinite stream of packed training windows, split over its workers."""

    def __init__(
        self,
        cfg: DataConfig,
        seq_len: int,
        shards: list[ShardShare],
        tokenizer: MusicTokenizer,
        reader: ShardReader,
        rank: int,
        world_size: int,
        views: ViewSpec | None = None,
    ):
        self.cfg, self.seq_len, self.shards = cfg, seq_len, shards
        self.tokenizer, self.reader = tokenizer, reader
        self.rank, self.world_size = rank, world_size
        self.augment = Augmenter(tokenizer.base.vocab, cfg.transpose_range, cfg.velocity_shift)
        self.controls = ControlTraining(tokenizer, cfg.attribute_controls)
        self.infill = InfillTraining(tokenizer, cfg.infill_rate, seq_len, self.controls)
        # The contrastive objective reads two views of each piece instead of packed windows.
        self.pairs = None
        if views is not None:
            vocab = tokenizer.base.vocab
            augment = Augmenter(vocab, cfg.transpose_range, *views[1:])
            self.pairs = ViewPairs(tokenizer, augment, views.view_tokens)
        self.epoch = self.block = self.done = 0
        self.packer = SequencePacker(seq_len)
        self.held: list[np.ndarray] = []  # packed windows not handed out yet
        self.handed = 0  # windows handed out from the held ones: the draw's counter
        self.stream = 0
        self.dealing = Dealing(shards, cfg.seed, cfg.shuffle_buffer, {})
        # The old streams' unpacked tokens, for a dealing on another number of streams.
        self.handover: list[list[int]] = []
        self.restored = False

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "block": self.block,
            "done": self.done,
            # A list, not an array: checkpoints load with torch.load(weights_only=True).
            "carry": self.packer.carry.tolist(),
            # Bytes: a state goes through the worker's queue with every batch, and bytes
            # pickle as one copy (a list of ints costs a conversion per token, a tensor a
            # file-descriptor handshake); torch.load(weights_only=True) reads them too, but
            # not empty bytes (pickled as a call of ``bytes``): None holds no window.
            "held": np.stack(self.held).tobytes() if self.held else None,
            "handed": self.handed,
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.block, self.done = state["epoch"], state["block"], state["done"]
        self.packer = SequencePacker(self.seq_len, state["carry"])
        self.held = held_windows(state, self.seq_len)
        self.handed = state.get("handed", 0)
        self.restored = True

    def __iter__(self) -> Iterator[np.ndarray]:
        worker = get_worker_info()
        workers, worker_id = (1, 0) if worker is None else (worker.num_workers, worker.id)
        stream, num_streams = self.rank * workers + worker_id, self.world_size * workers
        self.stream = stream
        size = self.cfg.shuffle_buffer
        if not self.restored:
            carry = handed_over(self.handover, stream, num_streams)
            self.packer = SequencePacker(self.seq_len, carry)
        while True:
            shares = stream_shares(self.shards, self.epoch, self.cfg.seed, stream, num_streams)
            slots = self._slots(shares, self.block * size)
            while pieces := list(islice(slots, size)):
                order = self.dealing.block_order(self.epoch, stream, self.block, len(pieces))
                for i in order[self.done :]:
                    self.done += 1
                    if pieces[i] is not None:
                        yield from self._shuffled(self._items(pieces[i]))
                self.block, self.done = self.block + 1, 0
            self.epoch, self.block = self.epoch + 1, 0
            if self.reader.damaged >= {s.url for s in self.shards}:
                raise CorruptShardError(f"every shard of {self.cfg.path} is damaged")

    def _slots(self, shares: list[ShardShare], start: int) -> Iterator[StoredPiece | None]:
        """The epoch's pieces (but those the dealing skips) from position ``start`` on; shards
        before it stay unopened."""
        for shard in shares:
            kept = self.dealing.kept(shard, self.epoch)
            if start < (left := int(kept.sum())):
                first = int(np.flatnonzero(kept)[start])
                pieces = self.reader.read(shard, first)
                yield from (p for keep, p in zip(kept[first:], pieces, strict=True) if keep)
            start = max(0, start - left)

    def _items(self, piece: StoredPiece) -> Iterator[np.ndarray]:
        """The packed windows a piece completes, or its two views."""
        if self.pairs is not None:
            return iter([self.pairs(piece.tokens, self._rng(piece))])
        return self.packer.add(self._document(piece))

    def _shuffled(self, windows: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        """``windows`` through the held ones: each new window takes the place of one drawn
        from them (seeded by the stream and the draw's count), which is handed out."""
        size = self.cfg.window_shuffle if self.pairs is None else 1
        for window in windows:
            if size == 1:
                yield window
            elif len(self.held) < size:
                self.held.append(window)
            else:
                draw = np.random.default_rng([self.cfg.seed, self.stream, self.handed])
                slot = int(draw.integers(size))
                out, self.held[slot] = self.held[slot], window
                # Moved on before the yield, as the packer does: a state saved now is exact.
                self.handed += 1
                yield out

    def _rng(self, piece: StoredPiece) -> np.random.Generator:
        # Seeded by the piece, not the stream: the same piece gets the same augmentation
        # whatever worker reads it.
        return np.random.default_rng([self.cfg.seed, self.epoch, zlib.crc32(piece.key.encode())])

    def _document(self, piece: StoredPiece) -> np.ndarray:
        rng = self._rng(piece)
        return self.infill(piece.labels, self.augment(piece.tokens, rng), rng)


class StreamingData:
    """One rank's view of a prepared dataset: the tokenizer, resumable training batches,
    validation batches and a count of damaged shards for the logs. Batches are (inputs,
    targets) LongTensors of shape [micro_batch_size, seq_len]."""

    def __init__(
        self,
        cfg: DataConfig,
        seq_len: int,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        views: ViewSpec | None = None,
    ):
        if cfg.storage_retry_s is not None:
            retries.configure(cfg.storage_retry_s)
        self.card, dataset_tokenizer = open_dataset(cfg)
        # The model's tokenizer: the dataset's, with the bar controls the run trains appended.
        self.tokenizer = with_controls(dataset_tokenizer, cfg.attribute_controls)
        self.cfg, self.seq_len, self.micro_batch_size = cfg, seq_len, micro_batch_size
        self.rank, self.world_size = rank, world_size
        shards = split_shares(cfg.path, "train", self.card)
        check_enough_pieces(shards, world_size * max(1, cfg.num_workers))
        # The damage and retry counts are shared with the workers: Values from the context they
        # start from. The retry budget travels with the reader (workers do not share globals).
        self.reader = ShardReader(
            len(self.tokenizer.base),
            cfg.on_corrupt_shard,
            WORKERS,
            retry_s=retries.retry_budget_s(),
        )
        self.train = TrainStream(
            cfg, seq_len, shards, self.tokenizer, self.reader, rank, world_size, views
        )
        self.collate = inputs_and_targets if views is None else view_batch
        self.layout = {"rank": rank, "world_size": world_size, "num_workers": cfg.num_workers}
        self._start_epoch = 0
        if cfg.num_workers:
            start_worker_server()
        self._loader = StatefulDataLoader(
            self.train,
            batch_size=micro_batch_size,
            num_workers=cfg.num_workers,
            # A worker hands over one array, pickled through its queue, not two tensors: torch
            # sends a tensor's storage as a file descriptor, which costs a socket connection
            # and an authentication handshake with the worker per tensor, on both sides (40%
            # of a worker's time at micro batch 8, and time the training process waits).
            collate_fn=np.stack,
            multiprocessing_context=WORKERS if cfg.num_workers else None,
            worker_init_fn=functools.partial(worker_init_fn, os.getpid()),
        )

    def train_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Infinite: from the start, or from the position load_state_dict restored."""
        return map(self.collate, self._loader)

    def val_batches(
        self, max_batches: int | None = None, split: str = "val"
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """A fresh pass over ``split``: unshuffled, unaugmented, packed as in training, the
        same number of batches on every rank (at most ``max_batches``)."""
        packer = SequencePacker(self.seq_len)
        pieces = self.reader.pieces(split_shares(self.cfg.path, split, self.card))
        windows = (
            w for p in pieces for w in packer.add(self.tokenizer.document(p.labels, p.tokens))
        )
        # zip over one iterator makes rounds of world_size windows and drops an incomplete one.
        mine = (round_[self.rank] for round_ in zip(*[windows] * self.world_size, strict=False))
        # Lists of micro_batch_size windows until none is left; the last may be shorter.
        batches = iter(lambda: list(islice(mine, self.micro_batch_size)), [])
        return map(inputs_and_targets, islice(batches, max_batches))

    @property
    def corrupt_shards(self) -> int:
        """Damaged shards met so far by this rank and its workers (each reading counts)."""
        return self.reader.corrupt.value

    @property
    def storage_retries(self) -> int:
        """Object-storage operations retried so far by this rank's reader and its workers."""
        return self.reader.retries.value

    def state_dict(self) -> dict:
        return {**self.layout, "loader": self._loader.state_dict(), "dealt": self._dealt()}

    def load_state_dict(self, state: dict) -> None:
        saved = {key: state[key] for key in self.layout}
        if saved != self.layout:
            raise ValueError(
                f"the data loader state was saved by {saved}, this loader is {self.layout}: "
                "an exact resume needs the same ranks and data.num_workers (resume_resharded "
                "takes the states of every old rank)"
            )
        self._deal(state.get("dealt", {}))
        self._loader.load_state_dict(state["loader"])

    def resume_resharded(self, states: list[dict]) -> DataPosition:
        """Goes on from the states every rank of a run with another number of ranks or
        workers saved (``state_dict()``, in rank order): each epoch they had begun is dealt
        anew to this run's streams, less the pieces they had consumed."""
        position = self.position(states)
        self._deal(
            {
                "epoch": min(position.consumed),
                "skip": position.consumed,
                "carries": position.carries,
            }
        )
        return position

    def position(self, states: list[dict]) -> DataPosition:
        """The world-size-free position that every rank's saved state describes together."""
        streams = []  # (stream, number of streams, position, dealing) of every old stream
        for state in states:
            workers = max(1, state["num_workers"])
            dealt = state.get("dealt", {})
            skip = dealt.get("skip", {})
            dealing = Dealing(self.train.shards, self.cfg.seed, self.cfg.shuffle_buffer, skip)
            for worker, at in enumerate(_stream_states(state["loader"], workers)):
                stream = state["rank"] * workers + worker
                # A worker that had given no batch yet stands where its dealing began.
                at = at or {
                    "epoch": dealt.get("epoch", 0),
                    "block": 0,
                    "done": 0,
                    "carry": handed_over(dealt.get("carries", []), stream, len(states) * workers),
                }
                streams.append((stream, state["world_size"] * workers, at, dealing))
        first = min(at["epoch"] for _, _, at, _ in streams)
        last = max(at["epoch"] for _, _, at, _ in streams)
        consumed = {}
        for epoch in range(first, last + 1):
            parts = [range_numbers(d.skip.get(epoch, [])) for *_, d in streams]
            parts += [
                d.consumed(epoch, stream, total, at)
                for stream, total, at, d in streams
                if epoch <= at["epoch"]
            ]
            consumed[epoch] = as_ranges(np.concatenate(parts))
        ordered = sorted(streams, key=lambda s: s[0])
        carries = [unpacked(at, self.seq_len) for _, _, at, _ in ordered]
        return DataPosition(consumed, carries)

    def _dealt(self) -> dict:
        """This dealing's constants: where it began, what it skips, the carries handed over."""
        train = self.train
        return {"epoch": self._start_epoch, "skip": train.dealing.skip, "carries": train.handover}

    def _deal(self, dealt: dict) -> None:
        """Starts the streams where ``dealt`` says (before the loader's iterator exists: the
        workers get the stream as it is then)."""
        self._start_epoch = dealt.get("epoch", 0)
        self.train.epoch, self.train.block, self.train.done = self._start_epoch, 0, 0
        self.train.dealing.skip = dealt.get("skip", {})
        self.train.handover = dealt.get("carries", [])
