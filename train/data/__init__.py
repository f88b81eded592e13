"""Data: sources (files, folders, globs, jsonl), tokenizers and batches."""
