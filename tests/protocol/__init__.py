"""The C-free Varlink protocol suite: the real asyncio server driven with raw JSON + NUL."""
