"""Pieces of `qtune eval`: answer metrics, the judge, the report."""
