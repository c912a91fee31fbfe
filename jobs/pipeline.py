"""Entry point for `ray job submit -- python jobs/pipeline.py [STAGE] [--config FILE] [key=value ...]`.

STAGE defaults to `run` (preprocess, teacher, then the label step, student, baseline and sweep the
config asks for); any stage of `python -m pipeline` works.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.cli import STAGES, main  # noqa: E402

if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0] not in (*STAGES, "evaluate", "predict", "mlflow-server", "-h", "--help"):
        args = ["run", *args]
    sys.exit(main(args))
