"""Model definitions on megatron-core (GPT-style MoE decoder now; the TimeExpert model later)."""
