"""Statistics over stored predictions: biomarkers, survival, spatial statistics, heatmap layers,
cross-modal queries, figures. Computes; the store only stores."""
