"""`make demo` end to end: samples -> preprocess -> train -> package -> tritonserver -> sheet."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from avatarforge.demo import PROMPTS, run_demo


@pytest.mark.integration
@pytest.mark.slow
def test_demo_runs_the_whole_path_and_triton_matches_diffusers(tmp_path):
    state = run_demo(tmp_path / "demo")
    assert (state.dataset / "manifest.json").is_file()
    assert state.package is not None and state.package.name == "demo.tar.gz"
    assert list(state.rows) == list(PROMPTS)
    for row in state.rows.values():
        assert list(row) == ["base", "local", "diff x8", "triton"]
        triton = np.asarray(Image.open(row["triton"]))
        assert triton.shape == (256, 256, 3)
        local = np.asarray(Image.open(row["local"]))
        assert not np.array_equal(np.asarray(Image.open(row["base"])), local)  # adapter acts
    # through the same JPEG encoder, tritonserver's images are the diffusers images
    assert state.triton_vs_local is not None and state.triton_vs_local <= 2
    sheet = Image.open(tmp_path / "demo" / "contact_sheet.png")
    assert sheet.width > 4 * 192 and sheet.height > 3 * 192
