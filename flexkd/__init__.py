"""flexkd: Flex-KD feature distillation for LLMs, and a Ray pipeline that runs it.

The method is plain PyTorch and imports no Ray, so it drops into any training loop::

    from flexkd import unit_importance_sum, finalize_importance, select_top_k_units, correlation_loss
"""

__version__ = "0.1.0"

from flexkd.method.directions import (
    auto_k,
    direction_energy_share,
    gradient_gram,
    project_onto_directions,
    top_directions,
    unit_energy_share,
)
from flexkd.method.importance import finalize_importance, hidden_state_gradients, unit_importance_sum
from flexkd.method.losses import (
    LinearProjector,
    causal_lm_loss,
    classification_loss,
    correlation_loss,
    linear_cka_loss,
    logit_distillation_loss,
    mse_feature_loss,
    projector_mse_loss,
    standardized_projector_mse_loss,
    topk_logit_distillation_loss,
)
from flexkd.method.selection import resolve_k, select_random_units, select_top_k_units, select_variance_units

__all__ = [
    "LinearProjector",
    "auto_k",
    "causal_lm_loss",
    "classification_loss",
    "correlation_loss",
    "direction_energy_share",
    "finalize_importance",
    "gradient_gram",
    "hidden_state_gradients",
    "linear_cka_loss",
    "logit_distillation_loss",
    "mse_feature_loss",
    "project_onto_directions",
    "projector_mse_loss",
    "resolve_k",
    "select_random_units",
    "select_top_k_units",
    "select_variance_units",
    "standardized_projector_mse_loss",
    "top_directions",
    "topk_logit_distillation_loss",
    "unit_energy_share",
    "unit_importance_sum",
]
