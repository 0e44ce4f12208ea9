"""The token grammar as a state machine over MidiTok's base token types, and the masks over
model ids that sampling applies at every step, so that what is drawn decodes as written.

REMI follows the order its encoder writes (``RemiRules``, shared with the repair); other
tokenizers follow MidiTok's own ``tokens_types_graph``. A learned piece is allowed when the
base tokens it expands to are allowed one after the other from the current state. States are
met lazily: the first time a state is reached, its mask over the whole vocabulary and its
successor for each allowed id are worked out once (a walk of a trie of the pieces' expansions)
and kept, so a step costs a tensor index and a dictionary look-up per row.
"""

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Protocol

import miditok
import numpy as np
import torch

from data_pipeline.tokenizer import MusicTokenizer

if TYPE_CHECKING:
    from mtrain.generation.controls import Steering

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemiRules:
    """What fixes the REMI grammar for one base tokenizer::

        (Bar TimeSig? (Position Tempo? note*)*)*    note = Program? Pitch Velocity Duration

    (TimeSig with use_time_signatures, Program with use_programs, PitchDrum for Pitch after
    Program_-1). Used by the sampling grammar and by the repair alike."""

    names: dict[int, tuple[str, str]]  # base id -> (family, value)
    note_parts: tuple[str, ...]
    drums_by_program: bool  # drums are Program_-1 PitchDrum_x, every other program Pitch_x
    positions_per_beat: int
    uses_time_signatures: bool
    default_time_signature: int | None  # the decoder's until the first TimeSig token

    @classmethod
    def of(cls, base: miditok.REMI) -> "RemiRules":
        cfg = base.config
        parts = [("Program", cfg.use_programs), ("Pitch", True), ("Velocity", cfg.use_velocities)]
        parts.append(("Duration", cfg.using_note_duration_tokens))
        return cls(
            names={i: tuple(name.split("_", 1)) for name, i in base.vocab.items()},
            note_parts=tuple(kind for kind, used in parts if used),
            drums_by_program=cfg.use_programs and cfg.use_pitchdrum_tokens,
            positions_per_beat=cfg.max_num_pos_per_beat,
            uses_time_signatures=cfg.use_time_signatures,
            default_time_signature=base.vocab.get("TimeSig_4/4"),
        )

    def note_kinds(self, read: int, drums: bool | None) -> tuple[str, ...]:
        """The families that may come as part ``read`` of a note (0 starts one); ``drums``
        says whether its Program is -1 (None: no Program read)."""
        part = self.note_parts[read]
        if part != "Pitch":
            return (part,)
        if not self.drums_by_program or drums is None:
            return ("Pitch", "PitchDrum")
        return ("PitchDrum",) if drums else ("Pitch",)

    def bar_length(self, time_signature: str) -> int:
        """Positions in a bar of ``time_signature`` ('3/4')."""
        return int(time_signature.split("/")[0]) * self.positions_per_beat


class Phase:
    HEAD = 0  # before the music: BOS and labels; the music opens with a Bar
    BAR = 1  # after a Bar, its TimeSig owed
    OPEN = 2  # in a bar, before its first Position
    POSITION = 3  # after a Position, owed a Tempo or a note
    EVENT = 4  # after a Tempo or a whole note
    NOTE = 5  # inside a note, ``read`` parts of it read
    FREE = 6  # after a prompt token out of grammar: anything, until the next Bar


class RemiState(NamedTuple):
    phase: int = Phase.HEAD
    position: int = -1  # the last Position in this bar
    bar_length: int = 0
    read: int = 0  # parts of the note being read
    drums: bool | None = None
    noted: bool = False  # a whole note written
    bars: int = 0  # Bar tokens read, counted only when a grammar fills a number of bars


class BaseGrammar(Protocol):
    """A grammar over base tokens: states are hashable and immutable."""

    def start(self) -> tuple: ...

    def step(self, state: tuple, base_id: int) -> tuple | None:
        """The state after ``base_id``, or None when the grammar forbids it there."""

    def resync(self, state: tuple, base_id: int) -> tuple:
        """The state after a prompt token the grammar forbids (music given, not drawn)."""

    def can_end(self, state: tuple) -> bool:
        """Whether the music may end here (EOS, or FIM_END closing a middle)."""

    def in_head(self, state: tuple) -> bool: ...

    def noted(self, state: tuple) -> bool: ...

    def bars(self, state: tuple) -> int: ...


class RemiGrammar:
    """REMI's order as ``RemiRules`` gives it; with ``count_bars`` each state knows how many
    Bar tokens it has read (a middle closes at the gap's bar count)."""

    def __init__(self, rules: RemiRules, count_bars: bool = False, max_bars: int | None = None):
        self.rules, self.count_bars, self.max_bars = rules, count_bars, max_bars
        default = rules.names.get(rules.default_time_signature, ("TimeSig", "4/4"))[1]
        self.default_length = rules.bar_length(default)

    def start(self) -> RemiState:
        return RemiState()

    def in_head(self, state: RemiState) -> bool:
        return state.phase == Phase.HEAD

    def noted(self, state: RemiState) -> bool:
        return state.noted

    def bars(self, state: RemiState) -> int:
        return state.bars

    def can_end(self, state: RemiState) -> bool:
        return state.phase in (Phase.OPEN, Phase.EVENT, Phase.FREE)

    def resync(self, state: RemiState, base_id: int) -> RemiState:
        return state._replace(phase=Phase.FREE)

    def _bar(self, state: RemiState) -> RemiState | None:
        bars = state.bars + 1 if self.count_bars else 0
        if self.max_bars is not None and bars > self.max_bars:
            return None
        phase = Phase.BAR if self.rules.uses_time_signatures else Phase.OPEN
        return RemiState(phase, -1, self.default_length, 0, None, state.noted, bars)

    def step(self, state: RemiState, base_id: int) -> RemiState | None:
        kind, value = self.rules.names[base_id]
        phase = state.phase
        if kind == "Bar":
            allowed = phase in (Phase.HEAD, Phase.OPEN, Phase.EVENT, Phase.FREE)
            return self._bar(state) if allowed else None
        if phase == Phase.FREE:
            return state
        if phase == Phase.HEAD:
            return None
        if phase == Phase.BAR:
            if kind != "TimeSig":
                return None
            return state._replace(phase=Phase.OPEN, bar_length=self.rules.bar_length(value))
        if kind == "Position":
            if phase not in (Phase.OPEN, Phase.EVENT):
                return None
            position = int(value)
            if not state.position < position < state.bar_length:
                return None
            return state._replace(phase=Phase.POSITION, position=position)
        if kind == "Tempo":
            return state._replace(phase=Phase.EVENT) if phase == Phase.POSITION else None
        if phase == Phase.NOTE:
            if kind not in self.rules.note_kinds(state.read, state.drums):
                return None
            return self._note_part(state, kind, value)
        if phase in (Phase.POSITION, Phase.EVENT) and kind in self.rules.note_kinds(0, None):
            return self._note_part(state._replace(read=0, drums=None), kind, value)
        return None

    def _note_part(self, state: RemiState, kind: str, value: str) -> RemiState:
        drums = value == "-1" if kind == "Program" else state.drums
        read = state.read + 1
        if read == len(self.rules.note_parts):
            return state._replace(phase=Phase.EVENT, read=0, drums=None, noted=True)
        return state._replace(phase=Phase.NOTE, read=read, drums=drums)


# Families that complete a note in MidiTok's other tokenizers (TSD, Structured, MIDI-Like).
NOTE_ENDS = ("Duration", "NoteOff")


class TypeGraphGrammar:
    """Any other MidiTok tokenizer: a token's family must follow the previous one's in
    MidiTok's ``tokens_types_graph`` (what the repair's filter keeps). A state is (the last
    family, whether a note was written, Bar tokens read)."""

    def __init__(self, base: miditok.MusicTokenizer, max_bars: int | None = None):
        self.kinds = {i: name.split("_")[0] for name, i in base.vocab.items()}
        self.graph = base.tokens_types_graph
        self.max_bars = max_bars

    def start(self) -> tuple:
        return (None, False, 0)

    def in_head(self, state: tuple) -> bool:
        return state[0] is None

    def noted(self, state: tuple) -> bool:
        return state[1]

    def bars(self, state: tuple) -> int:
        return state[2]

    def can_end(self, state: tuple) -> bool:
        return state[0] is not None

    def resync(self, state: tuple, base_id: int) -> tuple:
        return self._after(state, self.kinds[base_id])

    def step(self, state: tuple, base_id: int) -> tuple | None:
        kind = self.kinds[base_id]
        if state[0] is not None and kind not in self.graph.get(state[0], ()):
            return None
        after = self._after(state, kind)
        if self.max_bars is not None and after[2] > self.max_bars:
            return None
        return after

    def _after(self, state: tuple, kind: str) -> tuple:
        return (kind, state[1] or kind in NOTE_ENDS, state[2] + (kind == "Bar"))


@dataclass
class Ending:
    """When the music may end, and by which token: EOS after a piece's first note, or FIM_END
    once a middle holds ``bars`` Bar tokens (and a note, unless ``rests``)."""

    token: int
    bars: int | None = None
    rests: bool = False


@dataclass
class _Trie:
    children: dict[int, "_Trie"] = field(default_factory=dict)
    ids: list[int] = field(default_factory=list)  # model ids whose expansion ends here


class GrammarTable:
    """Per-state masks over model ids and per-state successors, built as states are met.

    ``mask(state_ids)`` is [rows, vocab] bool (True: allowed) on ``device``; ``after(sid,
    model_id)`` is the successor's state id. Specials, infilling tokens and labels are
    allowed only as the grammar's ``ending`` says (labels in the head, before any music)."""

    def __init__(
        self,
        tokenizer: MusicTokenizer,
        grammar: BaseGrammar,
        ending: Ending,
        device: torch.device | str = "cpu",
    ):
        self.tokenizer, self.grammar, self.ending = tokenizer, grammar, ending
        self.vocab = tokenizer.vocab_size
        # Labels proper: bar controls are placed only where a plan asks (``controls.Steering``).
        self.labels = np.array(tokenizer.conditioning_ids, dtype=np.int64)
        self.trie = _Trie()
        for model_id in range(tokenizer.num_specials, tokenizer.infill_offset):
            node = self.trie
            expansion = tokenizer.decode_base(np.array([model_id])).tolist()
            music = range(tokenizer.num_specials, len(tokenizer.base))
            if not expansion or not all(i in music for i in expansion):
                continue  # a learned vocabulary's <unk>: no music
            for base_id in expansion:
                node = node.children.setdefault(int(base_id), _Trie())
            node.ids.append(model_id)
        self.ids: dict[tuple, int] = {}
        self.states: list[tuple] = []
        self.successors: list[dict[int, tuple]] = []
        self.closable: list[bool] = []  # whether the music may end in each state
        # Ids drawn in a state that close the music instead (``Cursor.settle``).
        self.closers: list[set[int]] = []
        bar = tokenizer.bar_id
        self.bar_openers = [
            i
            for i in range(tokenizer.num_specials, tokenizer.infill_offset)
            if bar is not None and tokenizer.decode_base(np.array([i]))[:1].tolist() == [bar]
        ]
        self._masks = torch.zeros(0, self.vocab, dtype=torch.bool, device=device)
        self.device = device

    def state_id(self, state: tuple) -> int:
        sid = self.ids.get(state)
        if sid is None:
            sid = self._add(state)
        return sid

    def start(self) -> int:
        return self.state_id(self.grammar.start())

    def mask(self, state_ids: list[int]) -> torch.Tensor:
        return self._masks[torch.tensor(state_ids, device=self._masks.device)]

    def after(self, sid: int, model_id: int) -> int | None:
        """The successor of an allowed id; None for an id forbidden in state ``sid``."""
        state = self.successors[sid].get(model_id)
        return None if state is None else self.state_id(state)

    def read(self, sid: int, model_id: int) -> int:
        """The state after a prompt's token, allowed or not: BOS, labels and infilling tokens
        leave it as it is; music the grammar forbids resynchronises it."""
        nxt = self.after(sid, model_id)
        if nxt is not None:
            return nxt
        state = self.states[sid]
        base = self.tokenizer.decode_base(np.array([model_id])).tolist()
        for base_id in base:
            state = self.grammar.step(state, base_id) or self.grammar.resync(state, base_id)
        return self.state_id(state)

    def _add(self, state: tuple) -> int:
        sid = len(self.states)
        self.ids[state] = sid
        self.states.append(state)
        allowed = np.zeros(self.vocab, dtype=bool)
        successors: dict[int, tuple] = {}
        self._walk(self.trie, state, allowed, successors)
        grammar, ending = self.grammar, self.ending
        if grammar.in_head(state):
            allowed[self.labels] = True
            successors.update((int(i), state) for i in self.labels)
        closes = grammar.can_end(state) and (ending.rests or grammar.noted(state))
        last_bar = ending.bars is not None and grammar.bars(state) == ending.bars
        if closes and (ending.bars is None or last_bar):
            allowed[ending.token] = True
            successors[ending.token] = state
        closers = set()
        if closes and last_bar:
            # The model opening a bar past the gap's last says the gap is over: it closes.
            closers = {i for i in self.bar_openers if not allowed[i]}
            allowed[list(closers)] = True
        if not allowed.any():  # nothing fits: let the model choose, the repair counts it
            log.warning("the token grammar allows nothing after %s: sampling unmasked", state)
            allowed[:] = True
        self.successors.append(successors)
        self.closers.append(closers)
        self.closable.append(bool(self.grammar.can_end(state)))
        if sid == len(self._masks):  # room doubles, so that a new state rarely copies
            grown = torch.zeros(max(16, 2 * sid), self.vocab, dtype=torch.bool)
            grown[:sid] = self._masks.cpu()
            self._masks = grown.to(self.device)
        self._masks[sid] = torch.from_numpy(allowed).to(self.device)
        return sid

    def _walk(self, node: _Trie, state: tuple, allowed: np.ndarray, successors: dict) -> None:
        for base_id, child in node.children.items():
            nxt = self.grammar.step(state, base_id)
            if nxt is None:
                continue
            for model_id in child.ids:
                allowed[model_id] = True
                successors[model_id] = nxt
            self._walk(child, nxt, allowed, successors)


def base_grammar(tokenizer: MusicTokenizer, fill_bars: int | None = None) -> BaseGrammar:
    """The grammar of ``tokenizer``'s base vocabulary; with ``fill_bars``, counting bars up to
    that many."""
    if isinstance(tokenizer.base, miditok.REMI):
        return RemiGrammar(RemiRules.of(tokenizer.base), fill_bars is not None, fill_bars)
    return TypeGraphGrammar(tokenizer.base, fill_bars)


def piece_grammar(tokenizer: MusicTokenizer, device="cpu") -> GrammarTable:
    """The grammar of a piece from its head on: EOS only after its first note."""
    return GrammarTable(tokenizer, base_grammar(tokenizer), Ending(tokenizer.eos_id), device)


def middle_grammar(
    tokenizer: MusicTokenizer, bars: int, rests: bool = False, device="cpu"
) -> GrammarTable:
    """The grammar of an infilling middle of ``bars`` bars: it opens with a Bar, holds that
    many, and FIM_END closes it after the last (once it holds a note, unless ``rests``); a
    Bar drawn there, the model ending the last bar, closes it too."""
    ending = Ending(tokenizer.infill_ids.end, bars, rests)
    return GrammarTable(tokenizer, base_grammar(tokenizer, bars), ending, device)


class Cursor:
    """Where each row of a batch stands in the grammar, read token by token as the decoding
    loop writes them; ``constrain`` masks what the grammar forbids, narrowed by ``steering``
    (``controls.Steering``) where bar controls are asked."""

    def __init__(
        self,
        table: GrammarTable,
        rows: int,
        start: list[int] | None = None,
        steering: "Steering | None" = None,
    ):
        self.table, self.steering = table, steering
        self.sids = list(start) if start is not None else [table.start()] * rows
        self.done = [False] * rows
        self.reads = [0] * rows
        # Tokens read by each row up to the last place its music could end: what is left of
        # it, whole, when a length limit cuts it.
        self.whole = [0] * rows

    def constrain(self, logits: torch.Tensor) -> torch.Tensor:
        live = [sid for sid, done in zip(self.sids, self.done, strict=True) if not done]
        if not live:
            return logits
        allowed = self.table.mask(self.sids)
        if self.steering is not None:
            logits = self.steering.steer(logits, allowed, [not done for done in self.done])
        if any(self.done):  # ended rows draw what they like: nothing of theirs is kept
            allowed[torch.tensor(self.done, device=allowed.device)] = True
        return logits.masked_fill(~allowed, float("-inf"))

    def settle(self, drawn: torch.Tensor) -> torch.Tensor:
        """``drawn`` [rows] with each id that closes the music where it was drawn (a bar
        opened past a middle's last) replaced by the ending token."""
        if self.table.ending.bars is None:  # only a middle closes so
            return drawn
        ids = drawn.tolist()
        closing = [
            row
            for row, token in enumerate(ids)
            if not self.done[row] and token in self.table.closers[self.sids[row]]
        ]
        if not closing:
            return drawn
        drawn = drawn.clone()
        drawn[closing] = self.table.ending.token
        return drawn

    def read(self, row: int, model_id: int) -> None:
        """Row ``row``'s next token, drawn (allowed by construction) or the prompt's."""
        if self.steering is not None:
            self.steering.read(row, model_id)
        self.sids[row] = self.table.read(self.sids[row], model_id)
        self.reads[row] += 1
        if self.table.closable[self.sids[row]]:
            self.whole[row] = self.reads[row]

    def end(self, row: int) -> None:
        self.done[row] = True
