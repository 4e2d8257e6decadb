"""The remote-code architecture's files, copied flat into every folder ``export-hf`` writes for the
``megatron_moe_ext`` target (``checkpoint/hf_targets/remote.py`` lists them, with the pure-torch modules of
``kernels/`` and ``layers/`` they import relatively). This ``__init__`` only makes packaging ship them: the modules
are not imported from here (their relative imports resolve next to each other in an exported folder)."""
