"""Notes read out of a score for exact comparison: every field, in a stable order."""

import symusic


def notes(score: symusic.Score, ticks: tuple[int, int], inside: bool) -> list[tuple]:
    """Every note starting inside (or outside) [start, end) ticks, with all its fields."""
    start, end = ticks
    return sorted(
        (t.program, t.is_drum, n.time, n.duration, n.pitch, n.velocity)
        for t in score.tracks
        for n in t.notes
        if (start <= n.time < end) == inside
    )
