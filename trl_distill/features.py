"""Moved: feature KD now lives in [`trl_distill.terms`] (an extra loss term). These names are kept for old imports."""

from .terms import (  # noqa: F401
    FEATURE_PROJECTION_MODES,
    FEATURE_PROJECTIONS_NAME,
    FeatureProjectionCallback,
    FeatureProjector,
    FeatureTerm,
    build_feature_term,
    default_layer_map,
    load_feature_projections,
    parse_layer_map,
    resolve_layer_map,
    save_feature_projections,
)
