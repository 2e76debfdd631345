"""Built-in model pieces: character tokenizer, tiny llama-style LM, log-prob recomputation, warm start."""
