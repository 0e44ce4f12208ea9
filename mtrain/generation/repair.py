"""Generated tokens back to a valid MIDI score: REMI repaired to its grammar, other
tokenizers filtered by MidiTok's token-type graph, every change counted."""

import logging
from collections import Counter

import miditok
import symusic

from data_pipeline.tokenizer import MusicTokenizer
from mtrain.generation.grammar import RemiRules

log = logging.getLogger(__name__)

NOTE_KINDS = ("Program", "Pitch", "PitchDrum", "Velocity", "Duration")


class RemiRepair:
    """Rewrites any REMI token sequence into the grammar MidiTok's REMI encoder writes
    (``RemiRules``, the grammar sampling masks by), counting each token dropped or inserted by
    rule. It covers the REMI token families data_pipeline's tokenizers use (Bar, TimeSig,
    Position, Tempo, Program, Pitch, PitchDrum, Velocity, Duration); any other family is
    dropped as ``unknown_token``. One instance reads one sequence: use ``repair``.
    """

    def __init__(self, base: miditok.REMI):
        self.rules = RemiRules.of(base)
        self.names = self.rules.names
        self.note_parts = self.rules.note_parts
        self.uses_time_signatures = self.rules.uses_time_signatures
        self.time_signature = self.rules.default_time_signature
        self.bar_length = 4 * self.rules.positions_per_beat
        self.kept: list[int] = []
        self.repairs: Counter[str] = Counter()
        self.note: list[int] = []  # the note being read, written once complete
        self.position: tuple[int, int] | None = None  # (token, value) waiting for an event
        self.bar_position = -1  # the last position written in this bar
        self.needs_time_signature = False
        self.note_starts = self._next_kinds()

    def __call__(self, base_ids: list[int]) -> tuple[list[int], Counter[str]]:
        handlers = {
            "Bar": self._bar,
            "TimeSig": self._time_signature,
            "Position": self._position,
            "Tempo": self._tempo,
        }
        for token in base_ids:
            kind, value = self.names[token]
            if kind in NOTE_KINDS:
                self._note_token(token, kind)
                continue
            self._drop_note()
            if kind in handlers:
                handlers[kind](token, value)
            else:
                self.repairs["unknown_token"] += 1
        self._drop_note()
        self._drop_position()
        return self.kept, self.repairs

    def _next_kinds(self) -> tuple[str, ...]:
        """The kinds that may come next in the note being read, or start one."""
        drums = None
        if self.note and self.names[self.note[0]][0] == "Program":
            drums = self.names[self.note[0]][1] == "-1"
        return self.rules.note_kinds(len(self.note), drums)

    def _note_token(self, token: int, kind: str) -> None:
        if self.note and kind in self._next_kinds():
            self.note.append(token)
        elif kind in self.note_starts:
            self._drop_note()
            self.note = [token]
        else:  # a Velocity or Duration without its Pitch, a Pitch without its Program
            self.repairs["stray_note_token"] += 1
            return
        if len(self.note) == len(self.note_parts):
            if self.position is None and self.bar_position < 0:
                # The decoder would put it on the downbeat, where the encoder writes Position_0.
                self.repairs["note_without_position"] += len(self.note)
            else:
                self._write(*self.note)
            self.note = []

    def _bar(self, token: int, _value: str) -> None:
        self._drop_position()
        self._write(token)
        self.bar_position = -1
        self.needs_time_signature = self.uses_time_signatures

    def _time_signature(self, token: int, value: str) -> None:
        if not self.needs_time_signature or self.position is not None:
            self.repairs["stray_time_signature"] += 1
            return
        self.needs_time_signature = False
        self._write(token)
        self.time_signature = token
        self.bar_length = self.rules.bar_length(value)

    def _position(self, token: int, value: str) -> None:
        if int(value) <= self.bar_position:
            self.repairs["position_backwards"] += 1
        elif int(value) >= self.bar_length:
            self.repairs["position_past_bar"] += 1
        else:
            self._drop_position()
            self.position = (token, int(value))

    def _tempo(self, token: int, _value: str) -> None:
        if self.position is None:
            self.repairs["stray_tempo"] += 1
        else:
            self._write(token)

    def _write(self, *tokens: int) -> None:
        """Appends ``tokens`` after the TimeSig their bar lacks and the Position they are at."""
        if self.needs_time_signature:
            self.kept.append(self.time_signature)
            self.repairs["missing_time_signature"] += 1
            self.needs_time_signature = False
        if self.position is not None:
            self.kept.append(self.position[0])
            self.bar_position = self.position[1]
            self.position = None
        self.kept.extend(tokens)

    def _drop_note(self) -> None:
        if self.note:
            self.repairs["incomplete_note"] += len(self.note)
            self.note = []

    def _drop_position(self) -> None:
        if self.position is not None:
            self.repairs["empty_position"] += 1
            self.position = None


def follow_type_graph(
    base: miditok.MusicTokenizer, base_ids: list[int]
) -> tuple[list[int], Counter[str]]:
    """The generic filter for tokenizers other than REMI: keeps each token whose type may follow
    the last kept one in MidiTok's own grammar (``tokens_types_graph``), drops the rest."""
    kinds = {i: name.split("_")[0] for name, i in base.vocab.items()}
    kept: list[int] = []
    for token in base_ids:
        if not kept or kinds[token] in base.tokens_types_graph.get(kinds[kept[-1]], ()):
            kept.append(token)
    return kept, Counter(type_out_of_order=len(base_ids) - len(kept))


def repair(tokenizer: MusicTokenizer, model_ids) -> tuple[list[int], Counter[str]]:
    """Base ids in an order MidiTok decodes as written, from any model ids, and the tokens
    dropped or inserted, by rule. Specials and labels are left out uncounted: not music."""
    decoded = [int(i) for i in tokenizer.decode_base(model_ids)]
    # A learned vocabulary's <unk> decodes to no base token at all.
    base_ids = [i for i in decoded if tokenizer.num_specials <= i < len(tokenizer.base)]
    if isinstance(tokenizer.base, miditok.REMI):
        kept, repairs = RemiRepair(tokenizer.base)(base_ids)
    else:
        kept, repairs = follow_type_graph(tokenizer.base, base_ids)
    if len(base_ids) < len(decoded):
        repairs["unknown_token"] += len(decoded) - len(base_ids)
    return kept, repairs


def to_midi(tokenizer: MusicTokenizer, model_ids) -> tuple[symusic.Score, int]:
    """A valid score from any model ids, and how many tokens were dropped or inserted to get
    it. REMI is repaired by its grammar; other tokenizers are filtered by MidiTok's type graph
    and, should MidiTok still fail to decode them, give an empty score with every token
    counted as repaired."""
    base_ids, repairs = repair(tokenizer, model_ids)
    empty = symusic.Score(tokenizer.base.time_division)
    if not base_ids:
        return empty, repairs.total()
    try:
        return tokenizer.base_ids_to_midi(base_ids), repairs.total()
    except Exception as exc:  # MidiTok's decoders assume well-formed input
        log.warning("MidiTok could not decode %d tokens (%r): empty score", len(base_ids), exc)
        return empty, repairs.total() + len(base_ids)
