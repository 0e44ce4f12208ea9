"""mtrain.data.loader over real prepared shards: packing, splits, shuffling, augmentation, damage,
validation and exact resume."""

import io
import logging
import shutil
import signal
import tarfile
from itertools import islice, pairwise
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from support import datasets
from support.midi_factory import write_corpus

from data_pipeline.reader import (
    CorruptShardError,
    ShardReader,
    load_card,
    npy_tokens,
    split_shares,
)
from data_pipeline.tokenizer import MusicTokenizer
from mtrain.data.augmentation import Augmenter
from mtrain.data.dealing import stream_shares
from mtrain.data.loader import (
    DataConfig,
    StreamingData,
    _stream_states,
    held_windows,
    unpacked,
)
from mtrain.data.packing import SequencePacker
from mtrain.data.views import PAD as PAD_VIEW
from mtrain.data.views import ViewSpec

BOS, EOS, PAD = 1, 2, 0


def prepare(tmp_path_factory, *overrides: str) -> Path:
    root = tmp_path_factory.mktemp("loader")
    write_corpus(root / "midi", 40)
    return datasets.prepare(
        root / "midi",
        root / "ds",
        "workers=1",
        "shards.max_pieces=4",
        "split.val=0.2",
        "split.test=0.1",
        *overrides,
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return prepare(tmp_path_factory)


@pytest.fixture(scope="module")
def bpe_dataset(tmp_path_factory) -> Path:
    return prepare(tmp_path_factory, "tokenizer.learned.kind=bpe", "tokenizer.learned.size=600")


@pytest.fixture(scope="module")
def pieces(dataset) -> dict[tuple, tuple[str, str]]:
    """Base tokens of every train piece -> (piece name, shard name)."""
    found = {}
    for share in split_shares(str(dataset), "train", load_card(str(dataset))):
        for piece in ShardReader().pieces([share]):
            found[tuple(piece.tokens.tolist())] = (piece.meta["name"], Path(share.url).name)
    return found


def config(ds: Path, **overrides) -> DataConfig:
    """A small loader with augmentation off and windows handed out as packed, so documents
    can be matched to pieces."""
    settings = dict(num_workers=0, shuffle_buffer=4, transpose_range=0, window_shuffle=1)
    return DataConfig(path=str(ds), **{**settings, **overrides})


def data(
    ds: Path, seq_len=256, micro_batch_size=4, rank=0, world_size=1, **overrides
) -> StreamingData:
    return StreamingData(config(ds, **overrides), seq_len, micro_batch_size, rank, world_size)


def take(batches, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(islice(batches, n))


def inputs_of(batches) -> torch.Tensor:
    return torch.cat([inputs for inputs, _ in batches])


def train(ds: Path, n: int, **kwargs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return take(data(ds, **kwargs).train_batches(), n)


def documents(batches: list[tuple], num_workers: int) -> list[list[list[int]]]:
    """Each worker's whole documents [BOS ... EOS], in order. Workers take turns batch by
    batch, and the inputs of consecutive windows are the token stream without gaps."""
    streams = [[] for _ in range(max(1, num_workers))]
    for i, (inputs, _) in enumerate(batches):
        streams[i % len(streams)].extend(inputs.flatten().tolist())
    return [split_documents(tokens) for tokens in streams]


def split_documents(tokens: list[int]) -> list[list[int]]:
    docs, current = [], None
    for t in tokens:
        if t == BOS:
            current = [t]
        elif current is not None:
            current.append(t)
            if t == EOS:
                docs.append(current)
                current = None
    return docs


def body(doc: list[int]) -> tuple:
    """A document's piece tokens: after BOS and its one label (collection), before EOS."""
    return tuple(doc[2:-1])


def batches_per_epoch(ds: Path, tokens_per_batch: int) -> int:
    """Batches that hold a whole epoch of one stream, even one that got every piece."""
    train = load_card(str(ds))["splits"]["train"]
    return (train["tokens"] + 3 * train["pieces"]) // tokens_per_batch + 2


def epoch_size(cfg: DataConfig, epoch: int, stream: int, num_streams: int) -> int:
    shards = split_shares(cfg.path, "train", load_card(cfg.path))
    return sum(s.size for s in stream_shares(shards, epoch, cfg.seed, stream, num_streams))


def test_batches_are_packed_documents_without_padding(dataset):
    tok = MusicTokenizer.load(str(dataset / "tokenizer"))
    batches = train(dataset, 20, seq_len=100, micro_batch_size=3)
    for inputs, targets in batches:
        assert inputs.shape == targets.shape == (3, 100)
        assert inputs.dtype == targets.dtype == torch.int64
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
        assert not (inputs == PAD).any()
    ids = inputs_of(batches).flatten().tolist()
    docs = split_documents(ids)
    assert len(docs) >= 3
    label_ids = set(tok.describe()["labels"].values())
    assert all(doc[1] in label_ids for doc in docs)


@pytest.mark.parametrize(("world_size", "num_workers"), [(2, 2), (8, 0)])
def test_each_piece_is_read_once_per_epoch_across_ranks_and_workers(
    dataset, pieces, world_size, num_workers
):
    # 7 train shards: whole shards for 2 x 2 streams, shared shards for 8 x 1.
    cfg = config(dataset, num_workers=num_workers)
    per_worker = batches_per_epoch(dataset, 1024)
    workers = max(1, num_workers)
    seen = []
    for rank in range(world_size):
        batches = train(
            dataset, per_worker * workers, rank=rank, world_size=world_size, num_workers=num_workers
        )
        for worker, docs in enumerate(documents(batches, num_workers)):
            n = epoch_size(cfg, 0, rank * workers + worker, world_size * workers)
            assert len(docs) > n
            seen += [pieces[body(doc)][0] for doc in docs[:n]]
    assert sorted(seen) == sorted(name for name, _ in pieces.values())


def test_every_rank_takes_the_same_steps_with_uneven_shards(dataset):
    cfg = config(dataset)
    assert epoch_size(cfg, 0, 0, 2) != epoch_size(cfg, 0, 1, 2)  # 7 shards over 2 ranks
    steps = 3 * batches_per_epoch(dataset, 1024)
    assert [len(train(dataset, steps, rank=r, world_size=2)) for r in (0, 1)] == [steps, steps]


def test_shard_order_changes_each_epoch_and_repeats_across_runs(dataset, pieces):
    steps = 2 * batches_per_epoch(dataset, 1024)
    run = train(dataset, steps, shuffle_buffer=1)
    again = train(dataset, steps, shuffle_buffer=1)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(run, again, strict=True))

    def shard_order(docs):
        shards = [pieces[body(doc)][1] for doc in docs]
        return [s for i, s in enumerate(shards) if i == 0 or s != shards[i - 1]]

    docs = documents(run, 0)[0]
    n = len(pieces)
    first, second = docs[:n], docs[n : 2 * n]
    assert {body(d) for d in first} == {body(d) for d in second} == set(pieces)
    assert sorted(shard_order(first)) == sorted(shard_order(second))
    assert shard_order(first) != shard_order(second)

    shuffled = documents(train(dataset, steps, shuffle_buffer=8), 0)[0]
    assert len(shard_order(shuffled[:n])) > len(shard_order(first))


def pitch_range(tok: MusicTokenizer) -> tuple[int, int]:
    pitches = [int(n.split("_")[1]) for n in tok.base.vocab if n.startswith("Pitch_")]
    return min(pitches), max(pitches)


def names_of(tok: MusicTokenizer, ids) -> list[str]:
    names = {i: name for name, i in tok.base.vocab.items()}
    return [names[int(i)] for i in ids]


def test_transposition_moves_melodic_notes_only_within_range(dataset):
    tok = MusicTokenizer.load(str(dataset / "tokenizer"))
    vocab = tok.base.vocab
    low, high = pitch_range(tok)
    augment = Augmenter(vocab, transpose_range=5, velocity_shift=0)
    piece = [vocab[n] for n in ("Program_0", "Pitch_60", "Velocity_79", "Program_-1")]
    # Drums written as PitchDrum, and as Pitch after Program_-1 (use_pitchdrum_tokens off).
    piece += [vocab[n] for n in ("PitchDrum_36", "Pitch_40", "Program_33", f"Pitch_{high - 2}")]
    shifts = set()
    for seed in range(60):
        out = names_of(tok, augment(np.array(piece), np.random.default_rng(seed)))
        shift = int(out[1].split("_")[1]) - 60
        assert out[7] == f"Pitch_{high - 2 + shift}"
        unchanged = (0, 2, 3, 4, 5, 6)
        assert [out[i] for i in unchanged] == [names_of(tok, piece)[i] for i in unchanged]
        shifts.add(shift)
    # The top note, 2 below the highest pitch, leaves only -5..2 in range.
    assert shifts == set(range(-5, 3))
    at_edges = np.array([vocab[f"Pitch_{low}"], vocab[f"Pitch_{high}"]])
    assert np.array_equal(augment(at_edges, np.random.default_rng(0)), at_edges)


def test_velocity_shift_moves_every_velocity_by_one_amount(dataset):
    tok = MusicTokenizer.load(str(dataset / "tokenizer"))
    vocab = tok.base.vocab
    velocities = sorted((int(n.split("_")[1]), i) for n, i in vocab.items() if "Velocity_" in n)
    rank = {i: r for r, (_, i) in enumerate(velocities)}
    augment = Augmenter(vocab, transpose_range=0, velocity_shift=2)
    piece = np.array([velocities[5][1], vocab["Pitch_60"], velocities[9][1]])
    moved = set()
    for seed in range(30):
        out = augment(piece, np.random.default_rng(seed))
        assert out[1] == piece[1]
        moved.add(rank[int(out[0])] - 5)
        assert rank[int(out[2])] - 9 == rank[int(out[0])] - 5
    assert moved == set(range(-2, 3))


def test_loader_transposes_each_piece_by_one_shift_and_keeps_drums(dataset, pieces):
    tok = MusicTokenizer.load(str(dataset / "tokenizer"))
    docs = documents(train(dataset, batches_per_epoch(dataset, 1024), transpose_range=5), 0)[0]

    def skeleton(names):
        return tuple("Pitch" if n.startswith("Pitch_") else n for n in names)

    originals = {skeleton(names_of(tok, p)): p for p in pieces}
    shifts = []
    for doc in docs[: len(pieces)]:
        names = names_of(tok, body(doc))
        original = names_of(tok, originals[skeleton(names)])  # drums and all else unchanged
        moved = {
            int(n.split("_")[1]) - int(o.split("_")[1])
            for n, o in zip(names, original, strict=True)
            if n.startswith("Pitch_")
        }
        (shift,) = moved
        assert abs(shift) <= 5
        shifts.append(shift)
    assert len(set(shifts)) > 3


def test_learned_vocabulary_ids_stay_below_vocab_size(bpe_dataset):
    tok = MusicTokenizer.load(str(bpe_dataset / "tokenizer"))
    shares = split_shares(str(bpe_dataset), "train", load_card(str(bpe_dataset)))
    originals = {tuple(p.tokens.tolist()) for p in ShardReader().pieces(shares)}
    batches = train(bpe_dataset, 10)
    ids = inputs_of(batches)
    assert ids.min() > 0 and ids.max() < tok.vocab_size
    docs = documents(batches, 0)[0]
    assert docs
    assert all(tuple(tok.decode_base(np.array(body(d))).tolist()) in originals for d in docs)


def test_a_tokenizer_of_another_dataset_is_refused(dataset, bpe_dataset):
    theirs = str(bpe_dataset / "tokenizer")
    with pytest.raises(ValueError, match="tokenizer mismatch") as err:
        data(dataset, tokenizer=theirs)
    card_hash = load_card(str(dataset))["tokenizer"]["hash"]
    their_hash = MusicTokenizer.load(theirs).hash
    for part in (str(dataset), theirs, card_hash[:12], their_hash[:12]):
        assert part in str(err.value)


@pytest.fixture
def damaged(dataset, tmp_path) -> Path:
    """A copy of the dataset with three damaged train shards: garbage in the middle of one,
    another cut short, and a third whose third sample has a garbled tar header (which ends
    the tar silently)."""
    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    noise = np.random.default_rng(0)
    garbled = copy / "train-000001.tar"
    raw = bytearray(garbled.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 1024] = noise.bytes(1024)
    garbled.write_bytes(bytes(raw))
    cut = copy / "train-000004.tar"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 3])
    headless = copy / "train-000005.tar"
    with tarfile.open(headless) as tar:
        header = tar.getmembers()[4].offset  # two members per sample
    raw = bytearray(headless.read_bytes())
    raw[header : header + 512] = noise.bytes(512)
    headless.write_bytes(bytes(raw))
    return copy


def test_damaged_shards_are_skipped_and_counted(damaged, caplog):
    tok = MusicTokenizer.load(str(damaged / "tokenizer"))
    single = data(damaged)
    with caplog.at_level(logging.WARNING, logger="data_pipeline.reader"):
        batches = take(single.train_batches(), 2 * batches_per_epoch(damaged, 1024))
    ids = inputs_of(batches)
    assert ids.max() < tok.vocab_size
    assert single.corrupt_shards >= 3
    for name in ("train-000001.tar", "train-000004.tar", "train-000005.tar"):
        assert name in caplog.text

    workers = data(damaged, num_workers=2)
    take(workers.train_batches(), 2 * batches_per_epoch(damaged, 1024))
    assert workers.corrupt_shards >= 3

    with pytest.raises(CorruptShardError, match=r"train-00000[145]\.tar"):
        train(damaged, 1000, on_corrupt_shard="raise")


def test_a_reader_outside_training_stops_at_damage_naming_the_shard(damaged):
    card = load_card(str(damaged))
    shares = split_shares(str(damaged), "train", card)
    reader = ShardReader(card["tokenizer"]["base_vocab_size"])
    # The garbled header ends the tar silently: only the card's piece count tells.
    with pytest.raises(CorruptShardError, match=r"train-000005\.tar is damaged \(2 pieces"):
        list(reader.pieces(shares[5:]))
    skipping = ShardReader(card["tokenizer"]["base_vocab_size"], on_corrupt="skip")
    assert len(list(skipping.pieces(shares))) < card["splits"]["train"]["pieces"]
    assert skipping.corrupt.value == 3
    assert skipping.damaged == {shares[i].url for i in (1, 4, 5)}


def test_ids_past_the_base_vocabulary_are_damage(dataset):
    shares = split_shares(str(dataset), "train", load_card(str(dataset)))
    with pytest.raises(CorruptShardError, match="ids outside the base vocabulary"):
        next(ShardReader(base_vocab_size=5).pieces(shares))


def test_a_dataset_with_every_shard_damaged_fails_instead_of_spinning(dataset, tmp_path):
    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    for shard in copy.glob("train-*.tar"):
        shard.write_bytes(b"")
    with pytest.raises(CorruptShardError, match="every shard"):
        train(copy, 1)


def test_more_streams_than_a_shared_shard_can_feed_are_refused(dataset):
    # 7 shards for 16 ranks x 2 workers: 5 streams would share shards of 3 or 4 pieces.
    with pytest.raises(ValueError, match=r"fewer data\.num_workers"):
        data(dataset, num_workers=2, world_size=16)


@pytest.mark.parametrize(("num_workers", "window_shuffle"), [(0, 8), (2, 8), (0, 1)])
def test_resume_continues_with_the_batches_of_an_uninterrupted_run(
    dataset, tmp_path, num_workers, window_shuffle
):
    settings = dict(
        seq_len=128,
        num_workers=num_workers,
        transpose_range=5,
        velocity_shift=1,
        window_shuffle=window_shuffle,
    )
    run = data(dataset, **settings)
    batches = run.train_batches()
    take(batches, 11)
    torch.save(run.state_dict(), tmp_path / "data.pt")
    expected = take(batches, 30)  # crosses shuffle blocks and an epoch end

    resumed = data(dataset, **settings)
    resumed.load_state_dict(torch.load(tmp_path / "data.pt", weights_only=True))
    got = take(resumed.train_batches(), 30)
    for (inputs, targets), (inputs_again, targets_again) in zip(expected, got, strict=True):
        assert torch.equal(inputs, inputs_again)
        assert torch.equal(targets, targets_again)

    with pytest.raises(ValueError, match="same ranks"):
        data(dataset, rank=1, world_size=2, **settings).load_state_dict(run.state_dict())


def test_validation_is_finite_unaugmented_and_even_across_ranks(dataset):
    single = list(data(dataset, seq_len=64, micro_batch_size=2, transpose_range=5).val_batches())
    assert single and all(inputs.shape[1] == 64 for inputs, _ in single)
    plain = list(data(dataset, seq_len=64, micro_batch_size=2).val_batches())
    assert torch.equal(inputs_of(single), inputs_of(plain))

    ranks = [
        list(data(dataset, seq_len=64, micro_batch_size=2, rank=r, world_size=2).val_batches())
        for r in (0, 1)
    ]
    assert len(ranks[0]) == len(ranks[1]) > 2
    # The ranks' sequences, interleaved, are the single rank's up to the last odd one out.
    interleaved = torch.stack([inputs_of(r) for r in ranks], dim=1).flatten(0, 1)
    assert torch.equal(interleaved, inputs_of(single)[: len(interleaved)])
    capped = data(dataset, seq_len=64, micro_batch_size=2, world_size=2).val_batches(2)
    assert len(list(capped)) == 2


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGUSR2], ids=["USR1", "USR2"])
def test_loader_workers_outlive_the_preemption_signal(dataset, sig):
    """Slurm sends a preemption's warning (USR1 from slurm/train.sbatch, USR2 from submitit) to
    every process of the job: the rank checkpoints on it, and its loader workers (and their fork
    server) must take no notice."""
    batches = data(dataset, seq_len=64, num_workers=2).train_batches()
    take(batches, 2)
    server = [
        child for child in psutil.Process().children() if "forkserver" in " ".join(child.cmdline())
    ]
    assert len(server) == 1
    workers = server[0].children()
    assert len(workers) == 2
    for process in [*server, *workers]:
        process.send_signal(sig)
    take(batches, 20)  # more than the workers had prefetched
    assert all(process.is_running() for process in [*server, *workers])


@pytest.mark.parametrize("dtype", ["<u2", "<i4", "<i8", "|u1", ">i2"])
@pytest.mark.parametrize("size", [0, 1, 3000])
def test_npy_tokens_reads_what_np_save_wrote(dtype, size):
    tokens = (np.arange(size) % 250).astype(dtype)
    buf = io.BytesIO()
    np.save(buf, tokens, allow_pickle=False)
    got = npy_tokens(buf.getvalue())
    assert got.dtype == tokens.dtype and np.array_equal(got, tokens)


def test_npy_tokens_leaves_other_files_to_np_load_and_refuses_a_short_one():
    buf = io.BytesIO()
    np.save(buf, np.zeros((2, 3), dtype=np.int16), allow_pickle=False)
    assert npy_tokens(buf.getvalue()).shape == (2, 3)  # the piece reader refuses it then
    buf = io.BytesIO()
    np.save(buf, np.arange(100, dtype=np.uint16), allow_pickle=False)
    with pytest.raises(ValueError):
        npy_tokens(buf.getvalue()[:-2])
    with pytest.raises(ValueError):
        npy_tokens(b"not a numpy file at all")


def test_tempo_shift_moves_every_tempo_by_one_amount(dataset):
    vocab = MusicTokenizer.load(str(dataset / "tokenizer")).base.vocab
    tempos = sorted((float(n.split("_")[1]), i) for n, i in vocab.items() if "Tempo_" in n)
    rank = {i: r for r, (_, i) in enumerate(tempos)}
    augment = Augmenter(vocab, transpose_range=0, velocity_shift=0, tempo_shift=2)
    piece = np.array([tempos[5][1], vocab["Pitch_60"], tempos[9][1]])
    moved = {rank[int(augment(piece, np.random.default_rng(s))[0])] - 5 for s in range(30)}
    assert moved == set(range(-2, 3))
    assert all(
        rank[int(out[2])] - 9 == rank[int(out[0])] - 5
        for out in (augment(piece, np.random.default_rng(s)) for s in range(30))
    )


def test_the_contrastive_loader_gives_two_windows_of_one_piece_and_resumes_exactly(dataset, pieces):
    views = ViewSpec(view_tokens=48, velocity_shift=0, tempo_shift=0)
    loader = StreamingData(config(dataset), 48, 4, views=views)
    batches = loader.train_batches()
    first = next(batches)
    assert first.shape == (8, 48) and first.dtype == torch.int64
    docs = [(BOS, *p) for p in pieces]  # labels are left out of views
    for one, two in first.view(4, 2, 48).tolist():
        one, two = ([t for t in v if t != PAD_VIEW] for v in (one, two))
        owners = [{i for i, d in enumerate(docs) if contains(d, view)} for view in (one, two)]
        assert owners[0] & owners[1], "both views come from one piece"
        assert one != two
    state = loader.state_dict()
    after = [next(batches) for _ in range(2)]
    again = StreamingData(config(dataset), 48, 4, views=views)
    again.load_state_dict(state)
    resumed = again.train_batches()
    for expected in after:
        assert torch.equal(next(resumed), expected)


def contains(doc: tuple, window: list[int]) -> bool:
    n = len(window)
    return any(list(doc[i : i + n]) == window for i in range(len(doc) - n + 1))


def test_held_windows_are_handed_out_shuffled_and_none_is_lost(dataset):
    """With window_shuffle=k, the windows handed out and those held are exactly the windows
    packed in order, each once; consecutive ones mostly do not follow in packing order."""
    n, k, seq_len = 60, 8, 256
    packed = [w for inputs, _ in train(dataset, n + k, micro_batch_size=1) for w in inputs.tolist()]
    run = data(dataset, micro_batch_size=1, window_shuffle=k)
    shuffled = [w for inputs, _ in take(run.train_batches(), n) for w in inputs.tolist()]
    state = _stream_states(run.state_dict()["loader"], 1)[0]
    held = [w[:-1].tolist() for w in held_windows(state, seq_len)]  # as inputs
    key = {tuple(w): place for place, w in enumerate(packed)}
    places = [key[tuple(w)] for w in shuffled + held]
    assert sorted(places) == list(range(n + k))
    in_order = sum(b == a + 1 for a, b in pairwise(places[:n]))
    assert in_order < n // 4, places


def test_a_stream_handed_over_keeps_each_target_once():
    """``unpacked``: a stream's held windows and carry, packed again by another stream, give
    every token not yet a target exactly once as a target."""
    length = 4
    packer = SequencePacker(length)
    windows = list(packer.add(np.arange(1, 40)))
    handed, held = [windows[0], windows[2], windows[5]], [windows[4], windows[1], windows[3]]
    handed += windows[6:]
    at = {"carry": packer.carry.tolist(), "held": np.stack(held).tobytes()}
    again = SequencePacker(length)
    repacked = list(again.add(np.array(unpacked(at, length))))
    targets = [t for w in handed + repacked for t in w[1:]] + again.carry[1:].tolist()
    assert sorted(targets) == list(range(2, 40))
