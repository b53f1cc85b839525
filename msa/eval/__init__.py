"""Evaluation harnesses (needle in a haystack, attention recall)."""
