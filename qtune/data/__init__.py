"""Data: formats, chat templates, preparation."""
