"""apl-bench: the APL paper's protocol (seen / unseen / late identities, transfer, scenes) on the synthetic world.

```python
from apl_adapter.bench import run_bench, world_bench_inputs
spec, models, readers = world_bench_inputs(seeds=[0, 1])
report = run_bench(spec, models, readers, "runs/apl/adapter", "bench-out")   # report.json, report.md, grid.png

```
"""

from .protocol import AttributeReader, BenchModels, BenchReaders, BenchSpec, Person, SceneCase, SceneReader
from .runner import run_bench
from .world import world_bench_inputs

__all__ = [
    "AttributeReader",
    "BenchModels",
    "BenchReaders",
    "BenchSpec",
    "Person",
    "SceneCase",
    "SceneReader",
    "run_bench",
    "world_bench_inputs",
]
