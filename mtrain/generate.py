"""New music from a trained model: ``python -m mtrain.generate checkpoint=<export or run dir>
output=<dir> [num_samples=4] [label=collection:bach] [prompt=<file.mid> prompt_bars=4]``.

Unconditional, label-conditioned or a continuation of a MIDI file's first bars or seconds
(``mtrain.generation.job``); each sample as ``.mid``, piano-roll ``.png`` and ``.wav``.
"""

from data_pipeline.app import entry_point
from mtrain.generation.job import GenerateConfig, generate_samples, markdown


def run(cfg: GenerateConfig, overrides: list[str]) -> None:
    report = generate_samples(cfg, overrides)
    print(markdown(report["samples"]))
    print(f"{len(report['samples'])} samples in {cfg.output} (.mid, .png, .wav where rendered)")


main = entry_point("generate", GenerateConfig, run)

if __name__ == "__main__":
    main()
