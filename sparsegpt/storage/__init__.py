"""Models on disk: loading and saving (hub names, folders, GGUF, compact folders; `models`) and the compact
sparse checkpoint format (`compact`: spec and loading, `compact_codec`: tensor codecs, `compact_export`: export)."""
