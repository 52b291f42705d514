"""The cost model: what the annotation effort of a query is, in one place.

- **Image level** (``al.unit: image``): a cycle's budget is a number of images; an image's cost is what
  its oracle reports, one click per object it corrected (a machine costs 0).
- **Region level** (``al.unit: region``): a cycle's budget (``al.budget``, a count) is in
  ``al.budget_unit``: ``clicks``, one per queried region (the annotator points at the region and fills
  it with its class, or draws its few objects), or ``pixels``, the region's unlabelled pixels at the
  scoring resolution. A region costs its clicks whether the Dice gate accepts it or sends it back, so
  a returned region is effort spent for nothing (``gate/returned_cost``).

A cycle takes regions best first until its budget is spent: the last one may go over by less than its
own size, so a cycle never ends with budget to spare and a region never goes unlabelled for want of
a few pixels.
"""

from __future__ import annotations

from typing import Literal, TypeAlias

BudgetUnit: TypeAlias = Literal["clicks", "pixels"]
CLICKS_PER_REGION = 1


def region_cost(pixels: int, unit: BudgetUnit) -> int:
    """What one queried region of ``pixels`` pixels spends of a budget in ``unit``."""
    return CLICKS_PER_REGION if unit == "clicks" else int(pixels)
