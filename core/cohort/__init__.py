"""Cohorts as users have them: TCGA barcodes, the importer and its link report, clinical readers."""
