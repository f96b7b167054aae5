"""Training rows in TRL's formats, their tokenization, and the shipped tokenizer of the presets."""
