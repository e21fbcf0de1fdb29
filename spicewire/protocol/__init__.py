"""The SPICE protocol without I/O: numbers, payload layouts, framing and state machines."""
