"""Verifiable rewards: plain functions of a completion and its data row; code runs in a sandboxed subprocess."""
