"""Checkers for the exercises at the end of each chapter notebook (one module per chapter)."""
