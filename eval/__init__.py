"""Evaluation: ADM-protocol generation metrics (FID, sFID, IS, precision/recall) and reconstruction metrics."""
