"""The log's state, without I/O: region bitmaps, lifecycle rules, the engine (a deterministic
state machine), the restart rule."""
