"""Physics of acquisition: the clinical resolution distribution and the degradation model."""
