"""AnoCLIP benchmarks: latency, throughput and fidelity of every contender, with a report.

``anoclip-bench`` (``benchmarks.cli:main``) builds a ``BenchConfig``; ``runner.run_benchmark``
measures; ``report.write_report`` writes ``report.md``, ``results.json`` and a PNG plot.
"""
from .config import BenchConfig, Effort

__all__ = ["BenchConfig", "Effort"]
