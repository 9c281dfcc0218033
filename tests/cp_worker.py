"""One process of the two-process context-parallel test (tests/test_parallel.py), started with torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) on the CPU with gloo.

    python tests/cp_worker.py MODEL_DIR OUT.pt JSON_REQUEST [ATTENTION]

Runs ``qwen_core.parallel.run.parallel_session`` and the request through our generator; rank 0 saves the float
images (``torch.save``) and the session's description next to them (OUT.pt.txt).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def main() -> int:
    model, out, request = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    attention = sys.argv[4] if len(sys.argv) > 4 else "ulysses"
    torch.set_num_threads(1)
    from qwen_core.parallel.run import parallel_session
    from qwen_core.parallel.settings import ContextParallelSettings, distributed_env

    env = distributed_env()
    settings = ContextParallelSettings.parse(env.world_size, attention)
    with parallel_session(model, settings, device="cpu") as session:
        result = session.generator.generate(**request)
        if session.is_writer:
            torch.save(result.images, out)
            out.with_suffix(out.suffix + ".txt").write_text(session.handle.describe(), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
