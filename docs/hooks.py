"""mkdocs hooks: the plots of benchmarks/results/ served from where the benchmarks write them.

docs/benchmarks.md (written by docs/generate.py) shows them as assets/benchmarks/NAME.png; the files are
added to the site here instead of being copied into docs/.
"""
from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def on_files(files, config):
    for plot in sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"assets/benchmarks/{plot.name}", abs_src_path=str(plot)))
    return files
