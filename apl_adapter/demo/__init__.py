"""The end-to-end demo (``apl-demo``, what ``make demo`` runs): the shipped prefix's bench, then data, a short
training run, its bench and apl-export on the shipped world, with a report.

- :mod:`.recipe`: what the demo trains and benches (the ``DEMO_*`` settings, :func:`write_demo_data`,
  :func:`demo_train_config`); the shipped prefix and the acceptance test use the same data and settings;
- :mod:`.run`: :func:`run_demo` (bench -> data -> training -> bench), the export check, the tiny fallback;
- :mod:`.report`: ``report.md`` and ``report.json``;
- :mod:`.cli`: ``apl-demo``.

```python
from apl_adapter.demo import run_demo
report = run_demo("demo-out")   # demo-out/bench/report.md, grid.png; the trained adapter in demo-out/run/adapter

```
"""

from .recipe import demo_train_config, write_demo_data
from .run import run_demo

__all__ = ["demo_train_config", "run_demo", "write_demo_data"]
