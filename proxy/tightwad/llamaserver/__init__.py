"""The llama-server boundary: the only package that knows llama-server's JSON (wire types and
parsers), its async and blocking clients, slot pools and the tokenizer check."""
