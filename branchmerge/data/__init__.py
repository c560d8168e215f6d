"""Datasets in the one record schema, chat formats, label masks and packing."""
