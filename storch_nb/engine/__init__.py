"""The engine: compiled plan, vectorized pass, DiCE surrogate, result."""
