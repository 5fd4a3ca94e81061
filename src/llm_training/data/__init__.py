"""Data: sources, cleaning, tokenizer, preparation into token shards, and the resumable batch loader."""
