"""MIDI corpus -> tokens -> WebDataset shards on disk or object storage."""
