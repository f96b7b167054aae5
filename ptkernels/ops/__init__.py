"""Launchers, autograd Functions and backend dispatch, one file per op family."""
