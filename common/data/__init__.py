"""Datasets, loaders, augmentation and the seeds every process derives alike. Imports
``lte.common.core`` only."""
