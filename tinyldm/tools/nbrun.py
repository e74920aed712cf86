"""Run the notebooks top to bottom, keep their outputs, and record how long they took.

    python -m tinyldm.tools.nbrun notebooks/*.ipynb  # full run: outputs saved into the .ipynb
    python -m tinyldm.tools.nbrun --smoke notebooks/*.ipynb  # SMOKE=1: tiny settings, nothing saved
                                                               (what CI runs)
    python -m tinyldm.tools.nbrun --to_py notebooks/01_autoencoder.ipynb  # plain-text copy for
                                                                            editing or review
    python -m tinyldm.tools.nbrun --from_py 01_autoencoder.py  # back to .ipynb (outputs dropped)

Every notebook reads the environment variable SMOKE ("1" = tiny data and few steps). A full run
stores in the notebook's metadata (`tinyldm`) the date, the wall time, the CPU count and the torch
version, so a reader knows what the committed figures came from. The notebooks' kernel starts in
`notebooks/`.

The `.py` form is the "percent" format: cells start with `# %%` (code) or `# %% [markdown]`
(markdown, each line prefixed with `# `). Needs the `notebooks` extra (nbclient, nbformat,
ipykernel, matplotlib).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path


def execute(path: str | os.PathLike, *, smoke: bool, save: bool, timeout: int = 900) -> float:
    """Execute one notebook in a fresh kernel (cwd = its folder); raise on the first failing cell.

    Returns the wall time in seconds. With save=True the outputs and the run's metadata are written
    back.
    """
    import nbformat
    from nbclient import NotebookClient

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    env_smoke = os.environ.get("SMOKE")
    os.environ["SMOKE"] = "1" if smoke else "0"  # the kernel inherits this process's environment
    try:
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent.resolve())}})
        t0 = time.perf_counter()
        client.execute()
        seconds = time.perf_counter() - t0
    finally:
        if env_smoke is None:
            os.environ.pop("SMOKE", None)
        else:
            os.environ["SMOKE"] = env_smoke
    if save:
        import torch

        nb.metadata["tinyldm"] = {
            "smoke": smoke,
            "wall_seconds": round(seconds, 1),
            "date": datetime.date.today().isoformat(),
            "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}"
                       + (f", {torch.cuda.get_device_name()}"
                          if torch.cuda.is_available() else ", no GPU"),
            "torch": torch.__version__,
        }
        nbformat.write(nb, path)
    return seconds


def notebook_to_py(nb) -> str:
    """Cells as percent-format text (outputs are not kept)."""
    parts = []
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            body = "\n".join(f"# {line}" if line else "#" for line in cell.source.splitlines())
            parts.append(f"# %% [markdown]\n{body}")
        else:
            parts.append(f"# %%\n{cell.source}")
    return "\n\n".join(parts) + "\n"


def py_to_notebook(text: str):
    """The inverse of `notebook_to_py`: a new notebook (python3 kernel) with no outputs."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    chunks = text.split("# %%")
    if chunks[0].strip():
        raise ValueError("a percent-format notebook starts with '# %%' (text before "
                         "the first cell)")
    for chunk in chunks[1:]:
        header, _, body = chunk.partition("\n")
        body = body.strip("\n")
        if header.strip() == "[markdown]":
            lines = [line[2:] if line.startswith("# ") else line.lstrip("#")
                     for line in body.splitlines()]
            nb.cells.append(nbformat.v4.new_markdown_cell("\n".join(lines)))
        elif header.strip():
            raise ValueError(f"unknown cell header '# %%{header}' (use '# %%' or "
                             "'# %% [markdown]')")
        else:
            nb.cells.append(nbformat.v4.new_code_cell(body))
    return nb


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+")
    p.add_argument("--smoke", action="store_true", help="SMOKE=1 and do not save the outputs")
    p.add_argument("--to_py", action="store_true",
                   help="write <name>.py beside each notebook, and stop")
    p.add_argument("--from_py", action="store_true",
                   help="write <name>.ipynb beside each .py file, and stop")
    args = p.parse_args(argv)
    import nbformat

    for path in map(Path, args.paths):
        if args.to_py:
            path.with_suffix(".py").write_text(notebook_to_py(nbformat.read(path, as_version=4)))
            print(f"wrote {path.with_suffix('.py')}")
        elif args.from_py:
            nbformat.write(py_to_notebook(path.read_text()), path.with_suffix(".ipynb"))
            print(f"wrote {path.with_suffix('.ipynb')}")
        else:
            seconds = execute(path, smoke=args.smoke, save=not args.smoke)
            size = path.stat().st_size / 1e6
            print(f"{path}: {seconds:.0f} s ({'smoke' if args.smoke else 'full'} run), "
                  f"{size:.2f} MB", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
