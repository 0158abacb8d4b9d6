"""Run the `screen` stage alone (its inputs must be done):

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml \
        -- python -m jobs.screen --config configs/tiny.yaml [a.b=c ...]
"""

import sys

from jobs._entry import job_main

if __name__ == "__main__":
    sys.exit(job_main(__doc__.splitlines()[0], stages=["screen"]))
