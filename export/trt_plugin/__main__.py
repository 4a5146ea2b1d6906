"""``python -m apl_export.trt_plugin --check-build [--onnx FILE] [--module NAME]``: see :mod:`.check_build`."""

import sys

from .check_build import main

sys.exit(main())
