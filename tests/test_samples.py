"""The sample fetch's own conversions (``scripts/fetch_samples.py``): where a format no library reads is made NIfTI."""

from __future__ import annotations

import gzip
import json

import numpy as np

from fetch_samples import brainbrowser_volume


def test_a_brainbrowser_volume_lands_where_its_minc_header_puts_it():
    """BrainBrowser's volumes (the held-out real head of ``fetch_samples --real-heads``) are raw bytes in the header's
    axis order, slowest first, placed by MINC's starts, steps and direction cosines: each voxel must land at the world
    point (RAS, as NIfTI's) that MINC gives it, whatever the order and the signs of the steps. The expectation is
    MINC's placement as BrainBrowser's own loader computes it (the pinned package's
    src/brainbrowser/volume-viewer/volume-loaders/minc.js), written out here independently of the code."""
    lengths = {"xspace": 4, "yspace": 5, "zspace": 6}
    minc = {"order": ["xspace", "zspace", "yspace"],
            "xspace": {"start": 10.0, "step": -1.0, "direction_cosines": [0.996, 0.0785, 0.034]},
            "yspace": {"start": -20.0, "step": 2.0, "direction_cosines": [-0.0786, 0.997, 0.0]},
            "zspace": {"start": 30.0, "step": -1.5, "direction_cosines": [-0.0339, -0.0027, 0.9994]}}
    for axis, n in lengths.items():
        minc[axis]["space_length"] = n
    voxels = np.zeros([lengths[a] for a in minc["order"]], dtype=np.uint8)  # x slowest, then z, then y
    voxels[3, 1, 4] = 200  # x = 3, z = 1, y = 4
    image = brainbrowser_volume(gzip.compress(json.dumps(minc).encode()), gzip.compress(voxels.tobytes()))
    data = np.asarray(image.dataobj)
    assert data.shape == (4, 5, 6) and np.argwhere(data == 200).tolist() == [[3, 4, 1]]
    expected = sum((minc[a]["start"] + i * minc[a]["step"]) * np.asarray(minc[a]["direction_cosines"])
                   for a, i in (("xspace", 3), ("yspace", 4), ("zspace", 1)))
    assert np.allclose(image.affine @ [3, 4, 1, 1], [*expected, 1])
