"""Reports of stored runs: llama-bench-style tables, exports, self-contained HTML, session comparisons."""

from .compare import compare
from .formats import FORMATS, export, read
from .html import build_html
from .quality import pareto, quality_vs_speed
from .write import load_records, write_html

__all__ = ["FORMATS", "build_html", "compare", "export", "load_records", "pareto", "quality_vs_speed", "read",
           "write_html"]
