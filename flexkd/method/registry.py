"""The feature losses by name: what ``loss.feature`` may be, and what each one needs.

One :class:`FeatureLoss` entry is all a loss takes: the config accepts its name, the targets stage
and distill give it the teacher features it reads, distill trains the module it declares and
reports that module's parameters (docs/extending.md, "Add a feature loss").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from flexkd.method.losses import (
    LinearProjector,
    correlation_loss,
    linear_cka_loss,
    mse_feature_loss,
    projector_mse_loss,
    standardized_projector_mse_loss,
)

NO_FEATURE_LOSS = "none"  # loss.feature: none, no feature term


@dataclass(frozen=True)
class FeatureLoss:
    """One feature loss and what it needs.

    Attributes:
        name: the ``loss.feature`` value.
        function: ``(student, teacher, mask) -> []``, or ``(module, student, teacher, mask) -> []``
            when ``module`` is set; mask [B, T], 1 = valid token. student [B, T, k] and teacher
            [B, T, k]: the student's first k units and the k selected teacher units, paired by
            position; with ``whole_hidden``, student [B, T, d_S] and teacher [B, T, d_T].
        whole_hidden: compares whole hidden states instead of the k selected units (so a
            teacher-target cache must store every unit, targets.full_width).
        module: builds the parameters the loss trains for one layer pair from (d_S, d_T), e.g. a
            projector; None: it trains nothing but the student.
    """

    name: str
    function: Callable[..., Tensor]
    whole_hidden: bool = False
    module: Callable[[int, int], torch.nn.Module] | None = None

    def __call__(
        self, student: Tensor, teacher: Tensor, mask: Tensor, k: int, module: torch.nn.Module | None = None
    ) -> Tensor:
        """One layer pair's loss: student [B, T, d_S]; teacher [B, T, k'] the selected units (k' >= k)
        or [B, T, d_T] (whole_hidden); mask [B, T]; module: this pair's, when the loss trains one."""
        if not self.whole_hidden:
            student, teacher = student[..., :k], teacher[..., :k]
        if self.module is None:
            return self.function(student, teacher, mask)
        if module is None:
            raise ValueError(f"loss.feature {self.name!r} trains a module per layer pair, and none was given")
        return self.function(module, student, teacher, mask)


FEATURE_LOSSES: dict[str, FeatureLoss] = {
    loss.name: loss
    for loss in (
        FeatureLoss("correlation", correlation_loss),
        FeatureLoss("mse", mse_feature_loss),
        FeatureLoss("cka", linear_cka_loss, whole_hidden=True),
        FeatureLoss("projector", projector_mse_loss, whole_hidden=True, module=LinearProjector),
        FeatureLoss("projector_std", standardized_projector_mse_loss, whole_hidden=True, module=LinearProjector),
    )
}


def register_feature_loss(loss: FeatureLoss) -> FeatureLoss:
    """Add ``loss`` under its name (a name already taken is refused); returns it."""
    if loss.name == NO_FEATURE_LOSS:
        raise ValueError(f"feature loss name {NO_FEATURE_LOSS!r} is reserved: it means no feature loss")
    if loss.name in FEATURE_LOSSES:
        raise ValueError(f"feature loss {loss.name!r} is already registered")
    FEATURE_LOSSES[loss.name] = loss
    return loss


def reads_whole_hidden(name: str) -> bool:
    """Whether ``loss.feature: name`` compares whole hidden states; False for 'none' and for names
    the config refuses anyway."""
    return name in FEATURE_LOSSES and FEATURE_LOSSES[name].whole_hidden
