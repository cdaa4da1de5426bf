"""Models from spatial transcriptomics: ST section readers, references, training, LOSO, evaluation."""
