"""Evaluation of grounded answers: mask and text metrics (metrics.py), text similarity models, mask RLE."""
