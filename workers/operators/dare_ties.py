"""dare_ties: DARE sparsification, then TIES's sign election and disjoint merge (§2.5).

Defaults follow the papers (1/(1 − p) rescale, disjoint mean); mergekit's dare_ties is `rescale: l1,
normalize: false` (a disjoint weighted sum), which `recipe_from_mergekit` sets.
"""

from __future__ import annotations

from workers.operators.base import register
from workers.operators.dare import Dare, DareParams
from workers.operators.kernels import weighted_method


class DareTiesParams(DareParams):
    normalize: bool = True


@register
class DareTies(Dare):
    name = "dare_ties"
    Params = DareTiesParams
    elect = True
    mergekit_import = weighted_method("dare_ties", normalize=False, rescale=True)
