"""`python -m barber.stream ARGS` is `barber-stream ARGS`: the module form that torchrun launches.

    torchrun --standalone --nproc-per-node 4 -m barber.stream --ckpt CKPT --out OUT ...
"""

from __future__ import annotations

import sys

from barber.cli import stream_main

if __name__ == "__main__":
    sys.exit(stream_main())
