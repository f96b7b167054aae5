"""Sampling completions from the policy (the engines), scoring them, and the on-policy data source of PPO and GRPO."""
