"""HiMix vision-language models on megatron-core.

Layout follows the data flow: data/ -> model/ -> platform + cpu_compat (parallel setup) -> training
-> checkpoint conversion (tools/).
"""

__version__ = "0.1.0"
