"""Deep hashing for similar-nodule retrieval: network, training, codes, index and search (pure, no Dagster)."""
