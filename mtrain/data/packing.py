"""Packing documents back to back into fixed-length training windows, without padding."""

from collections.abc import Iterator, Sequence

import numpy as np


class SequencePacker:
    """Concatenates documents and cuts windows of ``length + 1`` tokens (inputs and targets
    shifted by one) that overlap by one token, so every token but the very first is a target
    exactly once and nothing is padded.

    ``carry``, the tokens not yet in a full window, is all the state a resumed packer needs.
    """

    def __init__(self, length: int, carry: Sequence[int] = ()):
        self.length = length
        self.carry = np.asarray(carry, dtype=np.int64)

    def add(self, document: np.ndarray) -> Iterator[np.ndarray]:
        """Appends a document; yields every window it completes."""
        self.carry = np.concatenate([self.carry, document])
        while len(self.carry) > self.length:
            window = self.carry[: self.length + 1]
            # Moved on before the yield: a state saved while the window is in use is exact.
            self.carry = self.carry[self.length :]
            yield window
