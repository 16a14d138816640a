"""Offline data: registry corpora and tasks, user files, tokenized block cache."""
