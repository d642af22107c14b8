"""Token mixers and their parts: attention, the neural-memory layer, and the four Titans blocks built from them
(`token_mixers.py`)."""
