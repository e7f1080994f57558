"""The README's Python example runs as written, on the real Fashion-MNIST, and its results make sense."""

import math
import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _use_block() -> str:
    text = README.read_text()
    section = text[text.index("## Use"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_readme_example_runs(tmp_path, monkeypatch):
    from lerpfast.data import DataNotFoundError, load

    try:
        load("fashion-mnist", split="test", limit=1)
    except DataNotFoundError:
        pytest.skip("Fashion-MNIST files not installed (apt-get install dataset-fashion-mnist)")
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(_use_block(), "README.md:Use", "exec"), ns)
    res, res2 = ns["res"], ns["res2"]
    assert res.K == 101 and np.allclose(res.alphas, np.linspace(-0.5, 1.5, 101))
    at0, at1 = int(np.argmin(abs(res.alphas))), int(np.argmin(abs(res.alphas - 1)))
    assert res.loss[at0] > 2.0 and res.error[at0] > 0.7  # untrained network: chance level
    assert res.error[at1] < 0.25  # two epochs of LeNet on Fashion-MNIST
    assert res.metrics["disagreement"][at0] == 0.0
    grid = res2.grid("loss")
    assert grid.shape == (21, 21)
    assert np.isfinite(grid).all()  # (alpha, beta) covers the triangle: theta0 + alpha(beta d1 + (1-beta) d2)
    assert math.isclose(np.nanmin(grid), np.nanmin(res2.loss))
    assert (tmp_path / "results.h5").exists()
