"""EFA 2.0 (elektronische Fallakte): pure messages, identity assertions, access and merge
rules, lifecycle, document relationships. No I/O, no Ray, no Redis."""
