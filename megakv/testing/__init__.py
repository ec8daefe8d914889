"""Test harnesses that are part of the project (not test cases): e.g. a throwaway local Slurm cluster."""
