"""What the training data pipeline and the identity cache share: seeded random streams and the data error."""

from __future__ import annotations

import numpy as np

# Independent random streams per sample: adding a draw to one never shifts the others.
STREAM_ORDER, STREAM_SAMPLE, STREAM_ID_VARIANT, STREAM_VALIDATION = 1, 2, 3, 4


class DataError(ValueError):
    """Training data that cannot be used, with the option and the fix in the message."""


def sample_rng(seed: int, stream: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, *keys])
