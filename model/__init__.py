"""The instrumented reference looped transformer (OpenMythos architecture, TransformerLens hooks).

Public: `LoopedConfig`, `LoopedTransformer`, `EXIT_POLICIES`.
"""

from mythos_probe.model.config import VARIANTS, LoopedConfig
from mythos_probe.model.looped import EXIT_POLICIES, LoopedTransformer

__all__ = ["LoopedConfig", "LoopedTransformer", "EXIT_POLICIES", "VARIANTS"]
