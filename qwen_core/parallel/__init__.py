"""Context-parallel denoising of one image over several processes (issue 16), with diffusers'
``ContextParallelConfig`` and launched by ``torchrun``.

``settings`` (the leaf: ``ContextParallelSettings``, ``CpAttention``, the torchrun command), ``context`` (the
process group and ``enable_context_parallel`` on a loaded pipeline) and ``run`` (``parallel_session``: one
process's whole session). Several cards in one process (components placed apart) is ``qwen_core.placement``.
"""

from qwen_core.parallel.settings import ContextParallelSettings, CpAttention, DistributedEnv, torchrun_command

__all__ = ["ContextParallelSettings", "CpAttention", "DistributedEnv", "torchrun_command"]
