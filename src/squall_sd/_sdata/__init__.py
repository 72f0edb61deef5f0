"""SpatialData plumbing shared by the whole package: element resolution, units, transformations, writes."""
