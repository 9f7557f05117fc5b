"""Product loops run against the real deployables: ``prefstream loop criteria`` teaches the served policy
a criterion through best-of-N, criteria feedback and continual DPO, and measures the served policy."""
