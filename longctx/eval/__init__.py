"""Long-context evaluation: line retrieval, needle in a haystack, perplexity by position."""
