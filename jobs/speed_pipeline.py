"""The whole SPEED pipeline as one driver job: topics -> ... -> evaluation, skipping finished stages.

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml \
        -- python -m jobs.speed_pipeline --config configs/tiny.yaml [a.b=c ...] [--stages ...]
"""

from __future__ import annotations

import sys

from jobs._entry import job_main


def main(argv: list[str] | None = None) -> int:
    return job_main(__doc__.splitlines()[0], argv=argv)


if __name__ == "__main__":
    sys.exit(main())
