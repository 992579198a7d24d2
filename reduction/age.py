"""A star cluster's age from its colour-magnitude diagram, by isochrone fitting: the public entry points.

The work is split by subject: ``reduction.age_model`` (isochrone interpolation and
the diagram's likelihood), ``reduction.age_fit`` (search, posterior, intervals)
and ``reduction.membership`` (the spatial membership prior).
"""

from reduction.age_fit import ISOCHRONE_SET, AgeFit, AgeFitError, fit_age
from reduction.membership import SpatialProfile, spatial_profile

__all__ = ["ISOCHRONE_SET", "AgeFit", "AgeFitError", "SpatialProfile", "fit_age", "spatial_profile"]
