"""Speed-ups of the transformer (issue 13): a fusible real-valued RoPE (``rope``), regional compilation with a
persistent, keyed compile cache (``compile``, ``compile_cache``), flash-attn 4 through our processor
(``attention``), and the typed choices that switch them (``options``). ``apply`` installs what a load asks for.
"""
