"""Data: where images come from (sources), how they become shards (preprocess), how workers read them (loading)."""
