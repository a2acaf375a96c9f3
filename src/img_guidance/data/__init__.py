"""Data the toolkit reads: prompt sets, preference pairs, instruction triplets."""
