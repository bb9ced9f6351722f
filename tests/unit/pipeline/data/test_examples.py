"""Pure parts of the training input: labels joined to example rows by URI."""

from __future__ import annotations

import numpy as np

from pipeline.data.examples import labelled_rows


def test_labelled_rows_keep_only_labelled_uris_with_their_multi_hot_targets():
    batch = {"uri": np.array(["a.wav", "unlabelled.wav", "b.wav", "c.wav"], dtype=object)}
    keep, target = labelled_rows(batch, {"a.wav": [2], "b.wav": (0, 2), "c.wav": []}, num_classes=3)
    assert keep.tolist() == [True, False, True, True]
    np.testing.assert_array_equal(target, [[0, 0, 1], [1, 0, 1], [0, 0, 0]])
    assert target.dtype == np.float32
