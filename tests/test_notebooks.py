"""Every notebook runs top to bottom in smoke mode (SMOKE=1), and is committed with a full run's
outputs."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat",
                               reason="the notebooks extra: pip install -e '.[notebooks]'")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

from tinyldm.tools.nbrun import execute, notebook_to_py, py_to_notebook  # noqa: E402

pytestmark = pytest.mark.slow  # runs every notebook in its smoke setting

# Every notebook's full run fits 10 minutes on 2 CPU cores of the faster kind of machine and 15 on
# the slower kind (the same run takes up to 1.8x longer there), except the experiment that needs
# training time itself: the compression sweep trains four diffusion models for the same minutes
# each.
LONG_RUNS = {"07_compression_tradeoff": 1500}
NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
MAX_MB = 3.0


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 5, [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_committed_with_full_outputs(path):
    nb = nbformat.read(path, as_version=4)
    run = nb.metadata.get("tinyldm")
    assert run is not None and run["smoke"] is False, (
        f"{path.name}: run `python -m tinyldm.tools.nbrun {path}` first")
    limit = LONG_RUNS.get(path.stem, 900)
    assert run["wall_seconds"] < limit, (f"{path.name}: full run took {run['wall_seconds']} s "
                                         f"(target < {limit} s)")
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count for c in code), f"{path.name}: cells without outputs"
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), (
        f"{path.name}: not run in order")
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{path.name}: committed with an error output"
    assert path.stat().st_size < MAX_MB * 1e6, f"{path.name} is {path.stat().st_size / 1e6:.1f} MB"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_smoke_mode(path):
    seconds = execute(path, smoke=True, save=False)
    assert seconds > 0


def test_percent_format_round_trip():
    text = ("# %% [markdown]\n# # Title\n#\n# Some *text*.\n\n# %%\nx = 1\nprint(x)\n\n"
            "# %%\ny = [\n    2,\n]\n")
    nb = py_to_notebook(text)
    assert [c.cell_type for c in nb.cells] == ["markdown", "code", "code"]
    assert nb.cells[0].source == "# Title\n\nSome *text*."
    assert nb.cells[2].source == "y = [\n    2,\n]"
    assert notebook_to_py(nb) == text
    with pytest.raises(ValueError, match="starts with"):
        py_to_notebook("x = 1\n# %%\n")
