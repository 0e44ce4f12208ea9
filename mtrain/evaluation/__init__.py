"""How good a model or a set of pieces is: likelihood, musical metrics, set comparison,
reports and piece embeddings."""
