"""The built-in corpus's score -> MIDI step: mtrain's lean export (``data_pipeline.music21_midi``)
against music21's own on the same parsed scores, CPU seconds, and whether the bytes agree.

    python bench/bench_music21_export.py --sample 60 --max-notes 3000 --seed 7

A random sample of the corpus's non-ABC scores (up to ``--max-notes`` written notes), each
parsed twice and exported once each way in the same process, alternating which goes first.
"""

import argparse
import random
import time
from collections import defaultdict

from music21 import corpus
from music21.midi import translate

from data_pipeline.music21_corpus import CorpusSpec, list_works
from data_pipeline.music21_midi import score_to_midi


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, default=60)
    parser.add_argument("--max-notes", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    works = [
        w
        for w in list_works(CorpusSpec(None))
        if not w.is_abc and (w.written_notes or 0) <= args.max_notes
    ]
    sample = random.Random(args.seed).sample(works, min(args.sample, len(works)))
    seconds = defaultdict(float)
    same = failed = 0
    for i, work in enumerate(sample):
        scores = {
            way: corpus.parse(work.source_path, forceSource=True) for way in ("music21", "lean")
        }
        out = {}
        for way in ("music21", "lean") if i % 2 else ("lean", "music21"):
            start = time.process_time()
            try:
                if way == "lean":
                    out[way] = score_to_midi(scores[way])
                else:
                    out[way] = translate.music21ObjectToMidiFile(scores[way]).writestr()
            except Exception as exc:  # both ways must fail alike
                out[way] = f"{type(exc).__name__}: {exc}"
            seconds[way] += time.process_time() - start
        same += out["lean"] == out["music21"]
        failed += isinstance(out["lean"], str)
        verdict = "same" if out["lean"] == out["music21"] else "DIFFERENT"
        print(f"{work.name:<60} {work.written_notes:>6} {verdict}", flush=True)
    print(
        f"{len(sample)} scores: lean export {seconds['music21'] / seconds['lean']:.2f}x "
        f"music21's ({seconds['lean']:.1f} vs {seconds['music21']:.1f} CPU s); same bytes "
        f"{same}/{len(sample)} ({failed} failed both ways)"
    )


if __name__ == "__main__":
    main()
