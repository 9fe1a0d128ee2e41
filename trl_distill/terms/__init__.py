"""Extra loss *terms* a mode may add beside its own loss (today: feature / hidden-state KD).

A term is built by the trainer once the student and the teacher are placed, and handed to the mode in
[`~trl_distill.modes.ModeContext`] (e.g. `context.feature_term`); a mode that supports it declares so on its class
(`supports_feature_term = True`) and calls it from `compute_loss`.
"""

from .feature import (
    FEATURE_PROJECTIONS_NAME,
    FeatureProjectionCallback,
    FeatureProjector,
    FeatureTerm,
    build_feature_term,
    load_feature_projections,
    save_feature_projections,
)
from .layer_map import (
    FEATURE_PROJECTION_MODES,
    default_layer_map,
    format_layer_map,
    parse_layer_map,
    resolve_layer_map,
)


__all__ = [
    "FEATURE_PROJECTIONS_NAME",
    "FEATURE_PROJECTION_MODES",
    "FeatureProjectionCallback",
    "FeatureProjector",
    "FeatureTerm",
    "build_feature_term",
    "default_layer_map",
    "format_layer_map",
    "load_feature_projections",
    "parse_layer_map",
    "resolve_layer_map",
    "save_feature_projections",
]
