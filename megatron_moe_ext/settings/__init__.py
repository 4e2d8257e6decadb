"""Typed, frozen settings of every feature, each built and checked by one pure function of a getter.

Pure Python (no torch, no Megatron), so the launcher checks flags cheaply before any rank starts:

| module         | settings                                        | built by               |
|----------------|-------------------------------------------------|------------------------|
| granularity.py | GranularitySettings (FineGrainedSizes)          | granularity_settings   |
| experts.py     | ExpertSettings                                  | expert_settings        |
| router.py      | RouterSettings (ProductKeyLayout)               | router_settings        |
| balancing.py   | BalanceSettings (coefficients, tracked names)   | balance_settings       |
| peer.py        | PEERSettings (PEERLayout, layer numbers)        | peer_settings          |
| aggregate.py   | MoEExtSettings: all of them                     | build_settings         |
| access.py      | a config's MoEExtSettings (``config.ext``)      | ext_settings           |

Each function reads values through ``get(name)`` by MoEExtConfig/TransformerConfig field name (the
config reads its own attributes; the flag path reads Megatron's args namespace through a name map).
Layers get them from ``ext_settings(config)``, never through ``getattr(config, name, default)``:
a default is stated once, in its MoEExtConfig field.
"""

from megatron_moe_ext.settings.access import ext_settings
from megatron_moe_ext.settings.aggregate import MoEExtSettings, build_settings

__all__ = ["MoEExtSettings", "build_settings", "ext_settings"]
